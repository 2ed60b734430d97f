"""Pre-training the tiny CLIP, so that its image features mean something.

A random-init CLIP maps every image to nearly the same embedding, which makes attacks and
accuracies meaningless. fedsim therefore pre-trains `fedsim-tiny-clip` itself, contrastively
(Radford et al. 2021, arXiv 2103.00020), on embedded image-caption pairs: half of the public
split of each embedded dataset (digits, faces, photos), which no client ever holds, plus
procedural shapes drawn with their own seed; captions come from class names and prompt
templates. The other half of each public split is where the server measures accuracy, so
zero-shot and federated accuracies are on images the model never saw.

Departure from CLIP's loss: with few captions, many images in a batch share one, so every
image-caption pair of the same class counts as a positive (soft targets) instead of only the
diagonal.

The weights are cached as safetensors under ~/.cache/fedsim/models (FEDSIM_CACHE overrides),
keyed on the recipe version and seed, written atomically.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from fedsim.models.clip import TINY_CLIP, create_clip, normalisation

RECIPE_VERSION = 2
TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.",
             "a small photo of a {}.", "a blurry photo of a {}.")
EMBEDDED = ("digits", "faces", "photos")


@dataclass(frozen=True)
class Recipe:
    steps: int = 1000
    batch_size: int = 128
    lr: float = 2e-3
    weight_decay: float = 0.05
    synthetic_classes: int = 16
    synthetic_per_class: int = 150


def cache_root() -> Path:
    """Where fedsim keeps what it builds or writes for later (FEDSIM_CACHE overrides)."""
    return Path(os.environ.get("FEDSIM_CACHE", Path.home() / ".cache" / "fedsim"))


def cache_dir() -> Path:
    return cache_root() / "models"


def checkpoint_path(seed: int = 0) -> Path:
    return cache_dir() / f"{TINY_CLIP}-v{RECIPE_VERSION}-seed{seed}.safetensors"


def pretraining_pairs(seed: int, recipe: Recipe) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images [N, 3, 32, 32], global class ids [N] and the class names they index."""
    from fedsim.data import pretraining_split_of
    from fedsim.datasets.synthetic import load_synthetic

    images, labels, names = [], [], []
    sets = [pretraining_split_of(name, 32) for name in EMBEDDED]
    sets.append(load_synthetic(32, seed + 10_000, recipe.synthetic_classes, recipe.synthetic_per_class))
    for ds in sets:
        offset = len(names)
        names.extend(ds.class_names)
        images.append(ds.images)
        labels.append(ds.labels + offset)
    return torch.cat(images), torch.cat(labels), names


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random shifts of up to 3 px (no flips: a mirrored digit is another symbol)."""
    dx, dy = (int(v) for v in torch.randint(-3, 4, (2,), generator=gen))
    return torch.roll(x, shifts=(dy, dx), dims=(2, 3))


def pretrain(seed: int = 0, recipe: Recipe = Recipe(), progress=None) -> dict[str, torch.Tensor]:
    """Train a tiny CLIP from scratch; returns its state dict."""
    torch.manual_seed(seed)
    clip, tokenizer = create_clip(TINY_CLIP)
    clip.train().requires_grad_(True)
    images, labels, names = pretraining_pairs(seed, recipe)
    captions = tokenizer([t.format(n) for n in names for t in TEMPLATES]).view(len(names), len(TEMPLATES), -1)
    mean, std = normalisation(clip)
    opt = torch.optim.AdamW(clip.parameters(), lr=recipe.lr, weight_decay=recipe.weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    for step in range(recipe.steps):
        idx = torch.randint(len(labels), (recipe.batch_size,), generator=gen)
        y = labels[idx]
        template = torch.randint(len(TEMPLATES), (recipe.batch_size,), generator=gen)
        img = F.normalize(clip.encode_image((_augment(images[idx], gen) - mean) / std), dim=-1)
        txt = F.normalize(clip.encode_text(captions[y, template]), dim=-1)
        logits = clip.logit_scale.exp().clamp(max=100) * img @ txt.T
        same = (y[:, None] == y[None, :]).float()
        targets = same / same.sum(1, keepdim=True)
        loss = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if progress:
            progress(step + 1, recipe.steps, loss.item())
    return {k: v.detach().contiguous() for k, v in clip.state_dict().items()}


def ensure_pretrained(seed: int = 0, console=None, rebuild: bool = False) -> Path:
    """The cached checkpoint, built on first use (or again with `rebuild`) with a progress bar;
    a rebuild replaces the old checkpoint only once the new one is complete."""
    path = checkpoint_path(seed)
    if path.exists() and not rebuild:
        return path
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), console=console, transient=True) as bar:
        task = bar.add_task("pre-training the tiny CLIP (first use only)", total=Recipe().steps)

        def report(done, total, loss):
            bar.update(task, completed=done, description=f"pre-training the tiny CLIP (first use only), "
                                                         f"loss {loss:.3f}")

        state = pretrain(seed, progress=report)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file(state, str(tmp), metadata={"recipe_version": str(RECIPE_VERSION), "seed": str(seed),
                                         "seconds": f"{time.perf_counter() - start:.0f}"})
    os.replace(tmp, path)  # atomic: a crash never leaves a half-written checkpoint behind
    return path
