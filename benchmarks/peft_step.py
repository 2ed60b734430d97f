"""Trainable parameters and time per client step (one gradient of a batch) for every PEFT method.

    .venv/bin/python benchmarks/peft_step.py --models tiny-clip ViT-B-32 --batch-size 8

Random init (`--pretrained none`): the cost does not depend on the weights. Times are the
median of --repeats steps after one warm-up step, on whatever device fedsim picks, one CPU
thread by default; the methods of one model take their steps in turn (round-robin), and
`vs_full` is each step time over full fine-tuning's in the same run: the number to compare
on a shared machine.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pandas as pd
import torch

from fedsim.config import CLIP_PEFT, RunConfig
from fedsim.harness import Setting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-clip", "ViT-B-32"])
    parser.add_argument("--methods", nargs="+", default=list(CLIP_PEFT))
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--out", default="runs/peft_step.csv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for model in args.models:
        setups = {}
        for peft in args.methods:
            setting = Setting(RunConfig(model=model, peft=peft, pretrained="none", batch_size=args.batch_size), device)
            truth = setting.truth(1, (0,))  # client 0's round-1 batch: the same for every method
            setups[peft] = (setting.task, setting.task.trainable(), (truth.images.to(device), truth.labels.to(device)))
            step(*setups[peft], device)  # warm-up
        # Round-robin over the methods, so that a change in machine load hits all of them alike.
        times = {peft: [] for peft in setups}
        for _ in range(args.repeats):
            for peft, setup in setups.items():
                times[peft].append(step(*setup, device))
        for peft, (task, params, _) in setups.items():
            total = sum(p.numel() for p in task.model.parameters())
            trainable = sum(p.numel() for p in params.values())
            rows.append({"model": model, "peft": peft, "trainable": trainable, "share": f"{trainable / total:.4%}",
                         "step_ms": round(1000 * statistics.median(times[peft]), 1)})
        base = next((r["step_ms"] for r in rows if r["model"] == model and r["peft"] == "full"), None)
        for r in rows:
            if r["model"] == model and base:
                r["vs_full"] = round(r["step_ms"] / base, 3)
        print(pd.DataFrame([r for r in rows if r["model"] == model]).to_string(index=False), flush=True)
        pd.DataFrame(rows).to_csv(args.out, index=False)  # one model's rows survive a stop in the next
        del setups
    table = pd.DataFrame(rows)
    table.to_csv(args.out, index=False)
    print(table.to_string(index=False))


def step(task, params, batch, device) -> float:
    """Seconds for one client step: the gradient of the batch's loss w.r.t. the trainable tensors."""
    start = time.perf_counter()
    task.gradients(params, *batch)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


if __name__ == "__main__":
    main()
