"""Model weights as one flat array on the wire: a round's message is a handful of Flower objects.

Flower 1.42 stores every ``Array`` of an ``ArrayRecord`` as its own objects (the array and
its chunks) and moves each object with its own request: ServerApp -> SuperLink, SuperLink
-> SuperNode, SuperNode -> ClientApp process, and the same way back. The demo's GAN with a
shared discriminator has 155 tensors, so one train message was ~310 objects per hop and
the transfers, not the GAN steps, were most of a deployment round (benchmarks/deploy_round.py).

:func:`pack_weights` concatenates a float32 state dict into one 1-D array stored under a
key that names its layout (``packed.<digest of names, shapes and dtypes>``);
:func:`unpack_weights` splits it again against a reference state of the same model (the
receiver builds the same networks). FedAvg averages the flat array element by element,
which is the per-tensor weighted mean. A record that is not packed is read as it is, so
a receiver takes either form; :func:`is_packed` tells a site which form to answer in.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping

import numpy as np
import torch
from flwr.app import Array, ArrayRecord

PREFIX = "packed."


class PackingError(ValueError):
    """Packed weights that do not fit the receiving model; the message names both layouts."""


def layout_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Hash of the state's key order, shapes and dtypes (16 hex digits)."""
    layout = [[k, list(v.shape), str(v.dtype)] for k, v in state.items()]
    return hashlib.sha256(json.dumps(layout).encode()).hexdigest()[:16]


def pack_weights(state: Mapping[str, torch.Tensor]) -> ArrayRecord:
    """One float32 array holding every tensor of ``state`` in its key order."""
    bad = {k: str(v.dtype) for k, v in state.items() if v.dtype != torch.float32}
    if bad:
        raise PackingError(f"only float32 weights are packed; not {bad}")
    if not state:
        raise PackingError("no weights to pack")
    flat = torch.cat([v.detach().reshape(-1).cpu() for v in state.values()]).numpy()
    return ArrayRecord({PREFIX + layout_digest(state): Array(flat)})


def is_packed(record: ArrayRecord) -> bool:
    keys = list(record.keys())
    return len(keys) == 1 and keys[0].startswith(PREFIX)


def unpack_weights(record: ArrayRecord, like: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict in ``record``, packed or not; a packed one is split by ``like``'s layout."""
    if not is_packed(record):
        return record.to_torch_state_dict()
    (key,) = record.keys()
    want = PREFIX + layout_digest(like)
    if key != want:
        raise PackingError(f"packed weights have layout {key[len(PREFIX):]}, this model's is {want[len(PREFIX):]}: "
                           "coordinator and site build different networks (generator/discriminator settings)")
    flat = torch.from_numpy(np.ascontiguousarray(record[key].numpy(), dtype=np.float32))
    total = sum(v.numel() for v in like.values())
    if flat.ndim != 1 or flat.numel() != total:
        raise PackingError(f"packed weights hold {flat.numel()} values in shape {tuple(flat.shape)}, "
                           f"the model has {total}")
    out: dict[str, torch.Tensor] = {}
    at = 0
    for k, v in like.items():
        n = v.numel()
        out[k] = flat[at:at + n].reshape(v.shape).clone()
        at += n
    return out
