"""Global accuracy over FedAvg rounds for PEFT methods on the pre-trained tiny CLIP.

Each method runs as a real `fedsim run` (Flower on Ray, no attack); the server's accuracy on
the public split per round comes from each run's metrics table. Writes curves.csv and curves.png.

    .venv/bin/python experiments/training_curve.py --rounds 10 --methods coop adapter --lrs 0.05 5
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd
from rich.console import Console

from fedsim.config import RunConfig
from fedsim.runner import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--methods", nargs="+", default=["coop", "adapter"])
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lrs", type=float, nargs="+", default=[0.05, 5.0],
                        help="client SGD learning rate per method, in --methods order (adapters need "
                             "a far larger plain-SGD step than prompts)")
    parser.add_argument("--out", default="runs/training_curve")
    args = parser.parse_args()

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    curves = []
    if len(args.lrs) != len(args.methods):
        parser.error(f"--lrs needs one value per method ({len(args.methods)}), got {len(args.lrs)}")
    for method, lr in zip(args.methods, args.lrs):
        cfg = RunConfig(peft=method, dataset=args.dataset, clients=args.clients, rounds=args.rounds,
                        protocol="fedavg", local_steps=args.local_steps, batch_size=args.batch_size,
                        lr=lr, attack="none", out=str(out / method), overwrite=True)
        curves.append(run(cfg, console=console).metrics.assign(peft=method))
    table = pd.concat(curves)
    table.to_csv(out / "curves.csv", index=False)
    console.print(table.pivot(index="round", columns="peft", values="accuracy").round(4).to_string())

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for method, g in table.groupby("peft"):
        ax.plot(g["round"], g["accuracy"], marker="o", label=method)
    ax.set(xlabel="round (0 = zero-shot)", ylabel=f"accuracy, held-out {args.dataset} public half",
           title=f"FedAvg, {args.clients} clients, {args.local_steps} local steps")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=120)
    console.print(f"wrote {out / 'curves.csv'} and {out / 'curves.png'}")


if __name__ == "__main__":
    main()
