"""Attack overhead and vectorised restarts, as ratios measured in one run (Inverting Gradients).

Three timings on the same model and batch (default: fedsim's ConvNet, batch 1, 32 px digits,
one CPU thread), taken in turn (round-robin over --repeats rounds, medians), so that a change in
machine load hits all of them alike:
- bare: one evaluation of the gradient-matching loss (cosine distance between the candidate's
  gradient and the observed one) and its gradient w.r.t. the candidate image, nothing else;
- iteration: one iteration of `attacks.ig.InvertingGradients` with R = 1 (the same loss plus TV,
  vmap over the restart dimension, signed Adam step, box projection), from a run of
  --iterations iterations;
- restarts: one iteration with R = --restarts restarts, vectorised by `vmap`.

Targets (issue 4): iteration / bare <= 1.2; restarts / (R x iteration) <= 0.6.

    PYTHONPATH=. .venv/bin/python benchmarks/attack_speed.py --out runs/attack_speed.csv
"""

from __future__ import annotations

import argparse
import statistics
import time

import pandas as pd
import torch

from attacks.objectives import cosine_distance
from attacks.optim import to_pixels
from fedsim.config import RunConfig
from fedsim.harness import Setting


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="convnet")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--iterations", type=int, default=50, help="attack iterations per timed run")
    parser.add_argument("--restarts", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/attack_speed.csv")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    # On CPU even where there is a GPU: the ratios are about --threads CPU threads' arithmetic.
    setting = Setting(RunConfig(model=args.model, peft="full", dataset="digits", batch_size=args.batch_size,
                                attack="ig", device="cpu"))
    obs, truth = setting.observe(round_=1, client=0)
    task, params, target, labels = setting.task, obs.global_params, obs.gradient(), truth.labels
    units = torch.randn(args.batch_size, *task.image_shape, requires_grad=True)

    def bare() -> float:
        start = time.perf_counter()
        for _ in range(args.iterations):
            loss = cosine_distance(task.functional_gradients(params, to_pixels(units), labels), target)
            torch.autograd.grad(loss, units)
        return (time.perf_counter() - start) / args.iterations

    def attack(restarts: int) -> float:
        # labels fixed by iDLG's rule at batch 1, else optimised jointly (the attack's default)
        ig = setting.attack(attack_iters=args.iterations, attack_restarts=restarts)
        start = time.perf_counter()
        ig.reconstruct(obs, task)
        return (time.perf_counter() - start) / args.iterations

    timers = {"bare": bare, "iteration": lambda: attack(1), "restarts": lambda: attack(args.restarts)}
    for timer in timers.values():
        timer()  # warm-up
    times = {name: [] for name in timers}
    for _ in range(args.repeats):
        for name, timer in timers.items():
            times[name].append(timer())
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    row = {"model": args.model, "batch_size": args.batch_size, "restarts": args.restarts,
           "bare_ms": round(ms["bare"], 2), "iteration_ms": round(ms["iteration"], 2),
           "restarts_ms": round(ms["restarts"], 2),
           "iteration_over_bare": round(ms["iteration"] / ms["bare"], 3),
           "restarts_over_R_iterations": round(ms["restarts"] / (args.restarts * ms["iteration"]), 3)}
    pd.DataFrame([row]).to_csv(args.out, index=False)
    print(pd.DataFrame([row]).T.to_string(header=False))
    print("targets: iteration_over_bare <= 1.2, restarts_over_R_iterations <= 0.6")


if __name__ == "__main__":
    main()
