"""What the honest-but-curious server sees of one client's reply, and nothing else.

An Observation holds the update tensors by parameter name, whether they are a gradient or a
weight delta, the global trainable parameters the server sent, the public hyper-parameters
of the protocol, the round and client id, and the public description of the frozen model.
It never holds images, labels, or the run's data seed. Observations save to a file that
loads with `torch.load(weights_only=True)`: tensors and plain values only, no pickled code.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from fedsim.protocol import UPDATE_KINDS, Params, pseudo_gradient

FORMAT_VERSION = 2  # 2: model_spec's model_seed is the model's own seed, not one derived from the data seed


@dataclass
class Observation:
    round: int
    client: int
    kind: str  # "gradient" (FedSGD) or "delta" (new weights minus global weights)
    update: Params
    global_params: Params
    batch_size: int  # examples behind the update, as the protocol reports them for weighting
    lr: float  # the client's learning rate, public in the training configuration
    local_steps: int
    model_spec: dict[str, Any] = field(default_factory=dict)  # public: enough to rebuild the model
    clients: tuple[int, ...] = ()  # secure aggregation: the clients behind an aggregate (client -1)

    def __post_init__(self) -> None:
        if self.kind not in UPDATE_KINDS:
            raise ValueError(f"update kind {self.kind!r} is not valid; valid: {', '.join(UPDATE_KINDS)}")
        missing = sorted(set(self.update) ^ set(self.global_params))
        if missing:
            raise ValueError(f"update and global parameters name different tensors: {missing}")

    def gradient(self) -> Params:
        """The update as a gradient. A weight delta of `local_steps` plain-SGD steps becomes
        the pseudo-gradient -delta / (lr * local_steps); exact for one step."""
        return pseudo_gradient(self.kind, self.update, self.lr, self.local_steps)

    def save(self, path: str | Path) -> None:
        torch.save({"format": FORMAT_VERSION, "meta": self.meta(),
                    "update": {n: t.detach().cpu() for n, t in self.update.items()},
                    "global_params": {n: t.detach().cpu() for n, t in self.global_params.items()}}, path)

    @classmethod
    def load(cls, path: str | Path) -> "Observation":
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # a file that is not a safe tensor archive: say which and why
            raise ValueError(f"{path} is not a readable observation file: {exc}") from exc
        if not isinstance(blob, dict) or blob.get("format") != FORMAT_VERSION:
            found = blob.get("format") if isinstance(blob, dict) else None
            old = f": it is format {found}, saved by an older fedsim; rerun the run" if found else ""
            raise ValueError(f"{path} is not a fedsim observation (format {FORMAT_VERSION}){old}")
        return cls(update=blob["update"], global_params=blob["global_params"], **blob["meta"])

    def meta(self) -> dict[str, Any]:
        """Everything but the tensors."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("update", "global_params")}
