"""Server-side optimiser on the FedAvg update (FedAvgM, FedAdam), on flat float arrays.

After FedAvg has averaged the sites' weights, the coordinator treats ``delta = average -
global`` as a pseudo-gradient (Reddi et al., "Adaptive Federated Optimization"):

* ``none``: ``global <- average`` (plain FedAvg, the default);
* ``momentum`` (FedAvgM): ``m <- beta*m + delta``; ``global <- global + lr*m``;
* ``adam`` (FedAdam): ``m <- b1*m + (1-b1)*delta``, ``v <- b2*v + (1-b2)*delta^2``,
  ``global <- global + lr*m/(sqrt(v)+eps)``.

Only the trainable parameters of G (``g.*``) and, when D is shared, of D (``d.*``) go through
it; buffers and ``G_ema`` (``g_ema.*``) take the average as they are. Written here on one flat
float32 vector per step rather than wrapping Flower's FedAvgM/FedAdam strategies: those work
on the whole ArrayRecord (buffers and G_ema included) and keep their state in the strategy
object, which the coordinator could not checkpoint for an exact resume. The state (``m``,
``v``, step count, the key layout) is a plain dict saved next to each round's checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from plan_shared.config import FederationConfig


class ServerOptError(ValueError):
    """Server optimiser state that does not fit this run (other keys or shapes)."""


class ServerOptimizer:
    """Applies ``federation.server_opt`` to the parameters named in ``names`` (others: the average)."""

    def __init__(self, fed: FederationConfig, names: Iterable[str]):
        self.kind = fed.server_opt
        self.lr, self.beta = fed.server_lr, fed.server_momentum
        self.b1, self.b2, self.eps = fed.server_adam_beta1, fed.server_adam_beta2, fed.server_adam_eps
        self.names = list(names)
        self.m: torch.Tensor | None = None
        self.v: torch.Tensor | None = None
        self.steps = 0

    def _flat(self, state: Mapping[str, torch.Tensor], keys: list[str]) -> torch.Tensor:
        return torch.cat([state[k].detach().reshape(-1).to(torch.float32) for k in keys])

    def step(self, current: Mapping[str, torch.Tensor], average: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The new global state: ``average`` with the optimised keys replaced by the optimiser's step."""
        out = dict(average)
        if self.kind == "none":
            return out
        keys = [k for k in self.names if k in average and average[k].is_floating_point()]
        if not keys:
            return out
        cur, avg = self._flat(current, keys), self._flat(average, keys)
        delta = avg - cur
        if self.m is None or self.m.numel() != delta.numel():
            if self.m is not None:
                raise ServerOptError(f"server optimiser state holds {self.m.numel()} values, the update {delta.numel()}")
            self.m = torch.zeros_like(delta)
            if self.kind == "adam":
                self.v = torch.zeros_like(delta)
        if self.kind == "momentum":
            self.m.mul_(self.beta).add_(delta)
            new = cur + self.lr * self.m
        else:  # adam
            assert self.v is not None
            self.m.mul_(self.b1).add_(delta, alpha=1.0 - self.b1)
            self.v.mul_(self.b2).addcmul_(delta, delta, value=1.0 - self.b2)
            new = cur + self.lr * self.m / (self.v.sqrt() + self.eps)
        self.steps += 1
        at = 0
        for k in keys:
            n = average[k].numel()
            out[k] = new[at:at + n].reshape(average[k].shape).to(average[k].dtype).clone()
            at += n
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "names": list(self.names), "steps": self.steps,
                "m": None if self.m is None else self.m.clone(), "v": None if self.v is None else self.v.clone()}

    def load_state_dict(self, sd: Mapping[str, Any]) -> None:
        if sd.get("kind") != self.kind:
            raise ServerOptError(f"server optimiser state is for {sd.get('kind')!r}, federation.server_opt is "
                                 f"{self.kind!r}; resume with the original setting")
        if list(sd.get("names", [])) != self.names:
            raise ServerOptError("server optimiser state was written for other weights (keys differ)")
        self.steps = int(sd["steps"])
        self.m = None if sd["m"] is None else sd["m"].clone()
        self.v = None if sd["v"] is None else sd["v"].clone()

    def save(self, path: str | Path) -> Path:
        import io

        from plan_shared.files import atomic_write

        buf = io.BytesIO()
        torch.save(self.state_dict(), buf)
        atomic_write(Path(path), buf.getvalue())
        return Path(path)

    def load(self, path: str | Path) -> None:
        self.load_state_dict(torch.load(Path(path), map_location="cpu", weights_only=True))


def optimised_names(g_params: Iterable[str], d_params: Iterable[str], share: str) -> list[str]:
    """The record keys the server optimiser updates: G's parameters, and D's when D is shared."""
    names = [f"g.{k}" for k in g_params]
    if share == "gd":
        names += [f"d.{k}" for k in d_params]
    return names
