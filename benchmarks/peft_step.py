"""Trainable parameters and time per client step (one gradient of a batch) for every PEFT method.

    .venv/bin/python benchmarks/peft_step.py --models tiny-clip ViT-B-32 --batch-size 8

Random init (`--pretrained none`): the cost does not depend on the weights. Times are the
median of --repeats steps after one warm-up step, on whatever device fedsim picks.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pandas as pd
import torch

from fedsim.config import CLIP_PEFT, RunConfig
from fedsim.data import federated_data
from fedsim.models import build_task, model_spec


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-clip", "ViT-B-32"])
    parser.add_argument("--methods", nargs="+", default=list(CLIP_PEFT))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default="runs/peft_step.csv")
    args = parser.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for model in args.models:
        for peft in args.methods:
            cfg = RunConfig(model=model, peft=peft, pretrained="none", batch_size=args.batch_size)
            data = federated_data(cfg)
            task = build_task(model_spec(cfg, data.private.class_names), device)
            images, labels = (t.to(device) for t in data.client_batch(cfg, 1, 0))
            params = task.trainable()
            times = []
            for i in range(args.repeats + 1):
                start = time.perf_counter()
                task.gradients(params, images, labels)
                if device == "cuda":
                    torch.cuda.synchronize()
                if i:
                    times.append(time.perf_counter() - start)
            total = sum(p.numel() for p in task.model.parameters())
            trainable = sum(p.numel() for p in params.values())
            rows.append({"model": model, "peft": peft, "trainable": trainable,
                         "share": f"{trainable / total:.4%}", "step_ms": round(1000 * statistics.median(times), 1)})
            print(rows[-1], flush=True)
            del task
    table = pd.DataFrame(rows)
    table.to_csv(args.out, index=False)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
