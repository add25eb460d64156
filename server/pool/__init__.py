"""Pool service: signed bundles over mutual TLS into a crash-safe content-addressed store.

* ``store.py``   files + SQLite index, atomic ingest, garbage collection, check
* ``service.py`` the gRPC service (roles, verification, streaming ingest)
* ``client.py``  reader side: list and pull
* ``reader_api.py`` a long-lived reader: catalog and verified image fetches
* ``web.py``     ``plan-server pool web``, a read-only browser of the pool
* ``cli.py``     ``plan-server pool serve|check|ls|pull|web``

The site side (sign and push) is ``client/export.py``; the bundle format and its
verification are shared in ``plan_shared/bundle.py``; the wire format is
``plan_shared/pool_proto/pool.proto``.
"""
