"""Pre-train the tiny CLIP (or load the cached one) and report its zero-shot accuracy on the
held-out half of each embedded dataset's public split (images it never saw; the server
measures global accuracy there too), against the random-init model.

    .venv/bin/python experiments/tiny_clip_zero_shot.py [--rebuild]
"""

from __future__ import annotations

import argparse
import time

import torch

from fedsim.config import RunConfig
from fedsim.harness import Setting
from fedsim.models.pretrain import checkpoint_path, ensure_pretrained
from fedsim.training import accuracy


def mean_offdiag_cosine(task, images) -> float:
    with torch.no_grad():
        f = task.model.image_features(images[:200])
    sim = f @ f.T
    n = len(f)
    return float((sim.sum() - sim.diagonal().sum()) / (n * (n - 1)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rebuild", action="store_true", help="delete the cached checkpoint first")
    args = parser.parse_args()
    if args.rebuild:
        checkpoint_path().unlink(missing_ok=True)
    start = time.perf_counter()
    ensure_pretrained()
    print(f"checkpoint {checkpoint_path()} ready in {time.perf_counter() - start:.0f}s")
    print(f"{'dataset':10s} {'classes':>7s} {'random init':>12s} {'pre-trained':>12s} "
          f"{'feature cos (rand -> pre)':>26s}")
    for name in ("digits", "faces", "photos", "synthetic"):
        row = []
        for pretrained in ("none", "fedsim"):
            setting = Setting(RunConfig(dataset=name, peft="linear-probe", pretrained=pretrained), device="cpu")
            held_out, task = setting.data.public_eval, setting.task
            row.append((accuracy(task, task.trainable(), held_out.images, held_out.labels)["accuracy"],
                        mean_offdiag_cosine(task, held_out.images)))
        print(f"{name:10s} {held_out.num_classes:7d} {row[0][0]:12.1%} {row[1][0]:12.1%} "
              f"{row[0][1]:12.3f} -> {row[1][1]:.3f}")


if __name__ == "__main__":
    main()
