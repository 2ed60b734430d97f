"""Model factory: every model takes images in [0, 1] and returns class logits, and only its
trainable (PEFT) parameters require gradients."""

from __future__ import annotations

import hashlib
import pickle
from typing import Any

import torch
from torch import nn

from fedsim.config import CLASSIC_MODELS, ConfigError, RunConfig
from fedsim.models.classic import LeNet, build_classic
from fedsim.models.clip import TINY_CLIP, create_clip
from fedsim.models.peft import CLIPAdapter, CLIPClassifier, CoOp, FullFineTune, LinearProbe, LoRA, VisualPrompt
from fedsim.models.pretrain import ensure_pretrained
from fedsim.task import Task

__all__ = ["build_model", "build_task", "model_spec", "derive_seed", "resolve_device", "LeNet", "CLIPClassifier"]

PEFT_OPTIONS = ("n_ctx", "coop_class_specific", "adapter_reduction", "adapter_ratio", "lora_rank",
                "lora_alpha", "lora_tower", "lora_targets", "vpt_tokens")


def model_spec(cfg: RunConfig, class_names: tuple[str, ...]) -> dict[str, Any]:
    """The public description of a run's model: everything needed to rebuild it, and nothing
    about the data (the init seed is the model's own, independent of the data seed)."""
    return {"model": cfg.model, "pretrained": cfg.pretrained, "peft": cfg.peft,
            "image_size": cfg.image_size, "class_names": list(class_names),
            "model_seed": cfg.model_seed,
            **{name: getattr(cfg, name) for name in PEFT_OPTIONS}}


def build_model(spec: dict[str, Any]) -> nn.Module:
    """The model a spec describes; every client and the server build the same one."""
    names = list(spec["class_names"])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(derive_seed(spec["model_seed"], "model"))
        if spec["model"] in CLASSIC_MODELS:
            return build_classic(spec["model"], len(names), spec["image_size"]).eval()
        clip_name = TINY_CLIP if spec["model"] == "tiny-clip" else spec["model"]
        pretrained = {"none": None, "fedsim": None}.get(spec["pretrained"], spec["pretrained"])
        if spec["pretrained"] == "fedsim":
            pretrained = str(ensure_pretrained())
        try:
            clip, tokenizer = create_clip(clip_name, pretrained)
        except Exception as exc:  # a checkpoint is the user's file: whatever is wrong with it, say so
            raise ConfigError(f"could not load --model {spec['model']} --pretrained {spec['pretrained']}: "
                              f"{_load_failure(exc)}. Pass an open_clip checkpoint file (a state dict saved "
                              "with torch.save, or safetensors) or, online, an open_clip pretrained tag") from None
        model = _peft(spec, clip, tokenizer, names)
    return model.eval()


def _load_failure(exc: Exception) -> str:
    if isinstance(exc, pickle.UnpicklingError):  # torch.load(weights_only=True) refused it
        return "the file is not a checkpoint of tensors (it could only be read by running code it holds)"
    first = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {first[0] if first else ''}"


def _peft(spec: dict[str, Any], clip: nn.Module, tokenizer, names: list[str]) -> CLIPClassifier:
    peft = spec["peft"]
    if peft == "coop":
        return CoOp(clip, tokenizer, names, spec["n_ctx"], spec["coop_class_specific"])
    if peft in ("adapter", "text-adapter", "double-adapter"):
        where = {"adapter": "image", "text-adapter": "text", "double-adapter": "double"}[peft]
        return CLIPAdapter(clip, tokenizer, names, where, spec["adapter_reduction"], spec["adapter_ratio"])
    if peft == "lora":
        targets = tuple(t.strip() for t in spec["lora_targets"].split(",") if t.strip())
        return LoRA(clip, tokenizer, names, spec["lora_rank"], spec["lora_alpha"], spec["lora_tower"], targets)
    if peft == "vpt":
        return VisualPrompt(clip, tokenizer, names, spec["vpt_tokens"])
    if peft == "linear-probe":
        return LinearProbe(clip, tokenizer, names)
    if peft == "full":
        return FullFineTune(clip, tokenizer, names)
    raise ConfigError(f"--peft {peft!r} is not valid for CLIP")


def build_task(spec: dict[str, Any], device: torch.device | str = "cpu") -> Task:
    model = build_model(spec).to(device)
    size = spec["image_size"]
    return Task(model, len(spec["class_names"]), (3, size, size))


def resolve_device(name: str) -> str:
    """auto = CUDA when this process sees a GPU (a Ray client actor sees one only when it asked
    for a GPU share), else CPU."""
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but CUDA is not available; valid here: auto, cpu")
    return name


def derive_seed(*parts) -> int:
    """A stable 63-bit seed from any parts (Python's hash() is salted per process)."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "little") >> 1
