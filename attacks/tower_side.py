"""MIP on visual-side PEFT (VPT, LoRA on the image tower, full fine-tuning): gradient matching
through the image tower over blends of public images instead of free pixels.

When the image tower itself trains, the image no longer enters the gradient through one
embedding, so the text-side and head-side estimates of `attacks.embeddings` do not apply. MIP
(Zhou et al. 2024, arXiv 2403.07901) attacks these updates by gradient matching through the
tower with priors; how, here (ours, the paper gives no detail):

1. Atoms. Every (public image, label) pair induces a gradient; each is scored by its squared
   distance to the observed gradient, relative to the observed gradient's norm. The squared
   distance, not the cosine: on the pre-trained tiny CLIP the update's magnitude carries the
   model's confidence, and the cosine picked the wrong label for one VPT digit in eight where
   the distance picked none. The best atoms give the labels: at batch 1 the best pair, at
   batch B the B best pairs on distinct images.
2. Blend fit. Each image is a convex combination of its label's top-k public images (weights
   through a softmax, starting with 0.6 on the best atom), the weights fitted by the same
   relative distance through the exact model.

Why blends of public images, not the decoders of the other routes: on 8 VPT digits, searching
the ridge decoder's manifold (a blend of atom embeddings, decoded) gave 14.9 dB and free pixels
6.6 dB, against 17 dB for pixel blends. A blend is the attacker's posterior-mean-like guess
within its public data; the fit itself moves the median little (17.1 dB at the start, 16.8
after 60 steps; images 3, 5 and 7 gain, 0 and 4 lose). The price: a blend of public digits
is closer to those public digits than to the private one, so feature identifiability against
a public gallery is low (README, MIP).

Cost per client: C gradient passes over the public split for the atoms (6 s for VPT on the
tiny CLIP; 27 s for LoRA on nn.MultiheadAttention, whose per-example gradients loop).
"""

from __future__ import annotations

import torch

from attacks.objectives import l2_distance
from fedsim.task import Params, Task

CHUNK_FLOATS = 2 ** 28  # per-example gradients held at once: 1 GiB of float32


def squared_norm(update: Params) -> torch.Tensor:
    """||g||^2 over all tensors together: what the distances here are relative to."""
    return sum((t ** 2).sum() for t in update.values())


def atom_distances(task: Task, params: Params, target: Params, images: torch.Tensor, chunk: int = 128,
                   progress=None) -> torch.Tensor:
    """||g(x_j, c) - g||^2 / ||g||^2 for every public image x_j and class c: [N, C]. Chunks
    shrink with the update's size (full fine-tuning of a ViT-B-32 holds 150M numbers per
    example)."""
    target_sq = squared_norm(target)
    chunk = max(1, min(chunk, CHUNK_FLOATS // sum(t.numel() for t in target.values())))
    out = torch.empty(len(images), task.num_classes)
    steps, done = task.num_classes * len(range(0, len(images), chunk)), 0
    for c in range(task.num_classes):
        for start in range(0, len(images), chunk):
            x = images[start:start + chunk]
            per = task.per_example_gradients(params, x, torch.full((len(x),), c, device=x.device))
            dot = sum((per[n].detach() * target[n]).flatten(1).sum(1) for n in target)
            sq = sum((per[n].detach() ** 2).flatten(1).sum(1) for n in target)
            out[start:start + len(x), c] = ((sq - 2 * dot + target_sq) / target_sq).cpu()
            done += 1
            if progress:
                progress(done, steps)
    return out


def pick_atoms(distances: torch.Tensor, batch: int) -> list[tuple[int, int]]:
    """(public index, label) per image: the B lowest-distance pairs on distinct public images
    (at batch 1, the best pair). Each pair is scored alone against the batch's gradient: a
    cheap proxy at B > 1, where no pair explains the whole update."""
    flat = distances.flatten().argsort()
    C = distances.shape[1]
    chosen: list[tuple[int, int]] = []
    for k in flat.tolist():
        j, c = divmod(k, C)
        if all(j != other for other, _ in chosen):
            chosen.append((j, c))
        if len(chosen) == batch:
            break
    return chosen


def tower_side(task: Task, params: Params, update: Params, batch: int, public_images: torch.Tensor,
               steps: int = 20, top_k: int = 16, max_atoms: int = 1024,
               progress=None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Labels [B], images [B, C, H, W] and diagnostics for a visual-side update. At most
    `max_atoms` public images are scored (the first ones; the embedded splits are smaller), so
    a large public split does not make every client cost C passes over all of it."""
    device = task.device
    public_images = public_images[:max_atoms].to(device)
    distances = atom_distances(task, params, update, public_images, progress=progress)
    picks = pick_atoms(distances, batch)
    labels = torch.tensor([c for _, c in picks], device=device)
    pools = torch.stack([distances[:, c].argsort()[:top_k] for _, c in picks])  # [B, k], best first
    pools[:, 0] = torch.tensor([j for j, _ in picks])
    atoms = public_images[pools]  # [B, k, C, H, W]
    weights = torch.zeros(pools.shape, device=device)
    weights[:, 0] = 3.0  # softmax ~ 0.6 on the best atom at k = 16
    weights.requires_grad_(True)
    target_sq = squared_norm(update)

    def blend(w: torch.Tensor) -> torch.Tensor:
        return torch.einsum("bk,bkchw->bchw", torch.softmax(w, -1), atoms)

    def distance(w: torch.Tensor) -> torch.Tensor:
        return l2_distance(task.functional_gradients(params, blend(w), labels), update) / target_sq

    opt = torch.optim.Adam([weights], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        distance(weights).backward()
        opt.step()
    weights = weights.detach()
    return labels, blend(weights), {"atom_distance": float(distances.min()),
                                    "fit_distance": float(distance(weights).detach())}
