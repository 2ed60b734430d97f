"""Cost of each defense on a client step, as a ratio to the undefended step measured in the same run.

    OMP_NUM_THREADS=1 .venv-own/bin/python benchmarks/defense_overhead.py --models tiny-clip ViT-B-32 \\
        --batch-size 8 --out runs/defense_overhead.csv

A client step is what a FedSGD client computes in a round (`fedsim.training.local_update`: the
gradient of its batch, then the update transforms), with random init (`--pretrained none`: the
cost does not depend on the weights) and `--peft adapter`, the method every client-loop defense
applies to (Soteria needs the adapter's first layer). Times are medians of --repeats steps after
one warm-up, with the defenses interleaved in each repeat so that load from other processes
falls on all of them alike. flower-dp (Flower's clipping mod: one norm) adds nothing measurable
to the client's computation; secagg (Flower's SecAgg+: key agreement, secret sharing, masking in
extra message rounds) costs protocol time outside the client step; neither is timed here.
"""

from __future__ import annotations

import argparse
import statistics
import time

import pandas as pd
import torch

from fedsim.config import RunConfig
from fedsim.harness import Setting
from fedsim.plugins import make_defense
from fedsim.training import local_update

DEFENSES = ["none", "dp", "dp-update", "prune", "quantize", "soteria"]


def step_times(model: str, peft: str, batch: int, defenses: list[str], repeats: int, device: str):
    """Median seconds of one client step per defense chain. One model (the Setting's task) and one
    batch (client 0, round 1) serve every chain: the defenses differ, nothing else does."""
    config = {"model": model, "peft": peft, "pretrained": "none", "batch_size": batch}
    setting = Setting(RunConfig(**config), device)
    task, truth = setting.task, setting.truth(1, (0,))
    images, labels, params = truth.images.to(device), truth.labels.to(device), task.trainable()
    chains = {d: make_defense(RunConfig(**config, defense=d)) for d in defenses}
    times: dict[str, list[float]] = {d: [] for d in defenses}
    for i in range(repeats + 1):
        for d, chain in chains.items():
            start = time.perf_counter()
            local_update(setting.protocol, task, chain, images, labels, params, torch.Generator().manual_seed(i))
            if device == "cuda":
                torch.cuda.synchronize()
            if i:  # the first pass warms up every code path
                times[d].append(time.perf_counter() - start)
            print(f"{model} {d} repeat {i}: {time.perf_counter() - start:.3f}s", flush=True)
    return {d: statistics.median(t) for d, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny-clip", "ViT-B-32"])
    parser.add_argument("--peft", default="adapter")
    parser.add_argument("--defenses", nargs="+", default=DEFENSES)
    parser.add_argument("--skip", nargs="*", default=[], metavar="MODEL:DEFENSE",
                        help="pairs not to time, e.g. ViT-B-32:soteria")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/defense_overhead.csv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows = []
    for model in args.models:
        defenses = [d for d in args.defenses if f"{model}:{d}" not in args.skip]
        if "none" not in defenses:
            defenses = ["none", *defenses]
        times = step_times(model, args.peft, args.batch_size, defenses, args.repeats, device)
        for d, t in times.items():
            rows.append({"model": model, "peft": args.peft, "batch_size": args.batch_size, "defense": d,
                         "device": device, "step_ms": round(1000 * t, 1), "ratio": round(t / times["none"], 2)})
        pd.DataFrame(rows).to_csv(args.out, index=False)
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
