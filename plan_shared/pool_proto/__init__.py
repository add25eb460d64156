"""Generated gRPC code of the pool service (source: ``pool.proto`` next to this file).

Regenerate with ``plan_shared/pool_proto/generate.sh`` (runs ``python -m
grpc_tools.protoc`` and makes the import in ``pool_pb2_grpc.py`` package-relative).
The generated files are committed; do not edit them by hand.

Package-boundary exception: ``plan_shared`` does not import grpc, except here and in
``plan_shared/pool_transport.py`` (the pool client's channel and retry policy, shared by
``client/`` and ``server/``). ``pool_pb2`` needs only protobuf; ``pool_pb2_grpc`` (stubs
and servicer base) imports grpc. Only ``client/``, ``server/`` and the transport import
``pool_pb2_grpc``; the method code stays grpc-free.

The generated code requires grpcio >= 1.81.1 and protobuf >= 6.33.5 at run time
(it checks and raises on import otherwise).
"""
