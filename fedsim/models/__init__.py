"""Model factory: every model takes images in [0, 1] and returns class logits, and only its
PEFT parameters require gradients."""

from __future__ import annotations

import hashlib
from typing import Any

import torch
from torch import nn

from fedsim.config import RunConfig
from fedsim.models.classic import LeNet
from fedsim.models.clip import TINY_CLIP, CoOpCLIP, create_clip
from fedsim.task import Task

__all__ = ["build_model", "build_task", "model_spec", "derive_seed", "LeNet", "CoOpCLIP", "TINY_CLIP"]


def model_spec(cfg: RunConfig, class_names: tuple[str, ...]) -> dict[str, Any]:
    """The public description of a run's model: everything needed to rebuild it, and nothing
    about the data (the init seed is derived one-way from the run seed)."""
    return {"model": cfg.model, "pretrained": cfg.pretrained, "peft": cfg.peft, "n_ctx": cfg.n_ctx,
            "image_size": cfg.image_size, "class_names": list(class_names),
            "model_seed": derive_seed(cfg.seed, "model")}


def build_model(spec: dict[str, Any]) -> nn.Module:
    """The model a spec describes; every client and the server build the same one."""
    class_names = spec["class_names"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec["model_seed"])
        if spec["model"] == "lenet":
            model = LeNet(len(class_names), spec["image_size"])
        elif spec["model"] == "tiny-clip":
            clip, tokenizer = create_clip(TINY_CLIP)
            model = CoOpCLIP(clip, tokenizer, list(class_names), n_ctx=spec["n_ctx"])
        else:
            raise ValueError(f"unknown model {spec['model']!r}; valid: lenet, tiny-clip")
    return model.eval()


def build_task(spec: dict[str, Any], device: torch.device | str = "cpu") -> Task:
    model = build_model(spec).to(device)
    size = spec["image_size"]
    return Task(model, len(spec["class_names"]), (3, size, size))


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any parts (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1
