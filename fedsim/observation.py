"""What the honest-but-curious server sees of one client's reply, and nothing else.

An Observation holds the update tensors by parameter name, whether they are a gradient or a
weight delta, the global trainable parameters the server sent, the public hyper-parameters
of the protocol, the round and client id, and the public description of the frozen model.
It never holds images, labels, or the run's data seed. Observations save to a file that
loads with `torch.load(weights_only=True)`: tensors and plain values only, no pickled code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch

from fedsim.options import shown
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
        check_saved(blob, path)
        meta = {**blob["meta"], "clients": tuple(blob["meta"]["clients"]), "lr": float(blob["meta"]["lr"])}
        return cls(update=blob["update"], global_params=blob["global_params"], **meta)

    def meta(self) -> dict[str, Any]:
        """Everything but the tensors."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("update", "global_params")}


def non_finite(tensors: Params) -> list[str]:
    """The names of the tensors that hold a NaN or an infinity."""
    return [name for name, t in tensors.items() if not bool(torch.isfinite(t).all())]


META = {"round": int, "client": int, "kind": str, "batch_size": int, "lr": (int, float), "local_steps": int,
        "model_spec": dict, "clients": (list, tuple)}  # a saved Observation's metadata and its types


def check_saved(blob: dict, path) -> None:
    """Validate a loaded observation file before anything is built from it (a replayed file is
    untrusted input): its keys, each metadata value's type and range, and the tensors (names
    alike in update and global parameters, same shapes, floating point, finite). Raises
    ValueError naming what is wrong; the model description's own keys are checked on replay
    (`fedsim.replay`), against the model it describes."""
    def bad(message: str):
        raise ValueError(f"{path} is not a valid observation: {message}")

    if set(blob) != {"format", "meta", "update", "global_params"}:
        bad(f"it holds {sorted(map(str, blob))}; expected format, meta, update, global_params")
    meta = blob["meta"]
    if not isinstance(meta, dict):
        bad(f"its metadata is a {type(meta).__name__}, not a mapping")
    if set(meta) != set(META):
        unknown, missing = sorted(map(str, set(meta) - set(META))), sorted(set(META) - set(meta))
        bad("metadata " + "; ".join(part for part in (f"unknown: {', '.join(unknown)}" if unknown else "",
                                                      f"missing: {', '.join(missing)}" if missing else "") if part))
    for key, kind in META.items():
        value = meta[key]
        if not isinstance(value, kind) or isinstance(value, bool):
            bad(f"metadata {key} is {shown(value)} ({type(value).__name__})")
    if meta["kind"] not in UPDATE_KINDS:
        bad(f"update kind {meta['kind']!r}; valid: {', '.join(UPDATE_KINDS)}")
    for key, low in (("round", 1), ("client", -1), ("batch_size", 1), ("local_steps", 1)):
        if meta[key] < low:
            bad(f"metadata {key} is {meta[key]}; it must be >= {low}")
    if not (math.isfinite(meta["lr"]) and meta["lr"] > 0):
        bad(f"learning rate {meta['lr']!r}; it must be a finite number > 0")
    if not all(isinstance(c, int) and not isinstance(c, bool) for c in meta["clients"]):
        bad(f"clients {shown(meta['clients'])} must be client ids")
    for part in ("update", "global_params"):
        tensors = blob[part]
        if not isinstance(tensors, dict) or not tensors:
            bad(f"{part} is not a non-empty mapping of tensors")
        for name, t in tensors.items():
            if not isinstance(name, str) or not isinstance(t, torch.Tensor) or not t.is_floating_point():
                bad(f"{part}[{name!r}] is not a floating-point tensor")
        broken = non_finite(tensors)
        if broken:
            bad(f"{part}[{broken[0]!r}] holds NaN or infinite values")
    if set(blob["update"]) != set(blob["global_params"]):
        bad(f"update and global parameters name different tensors: "
            f"{sorted(set(blob['update']) ^ set(blob['global_params']))}")
    for name, t in blob["update"].items():
        if t.shape != blob["global_params"][name].shape:
            bad(f"update[{name!r}] has shape {list(t.shape)}, the global parameter "
                f"{list(blob['global_params'][name].shape)}")
