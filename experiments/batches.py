"""Leakage against batch size and against FedAvg's local steps (issue 17): what MIP recovers from
CLIP-Adapter and CoOp updates of iid batches with repeated labels, next to Inverting Gradients on
the ConvNet and the label rules (GradInversion, iLRG) on the same batches.

Each cell (setting, batch size, local steps) attacks the first --clients clients' round-1 updates
through `fedsim.harness.Setting` (the clients' own code; the tiny pre-trained CLIP, digits, iid)
and scores them with its Scorer. Rows are appended to results.csv as they finish and a rerun skips
the cells already there, so a long run can be stopped and continued.

    .venv/bin/python experiments/batches.py --quick                      # a few cells, minutes
    .venv/bin/python experiments/batches.py                              # every cell (about an hour on 2 cores)
    .venv/bin/python experiments/batches.py --settings mip-adapter --batches 8 --clients 8

Writes results.csv, summary.csv (medians per cell), batch.png, steps.png and, at batch 8, one
grid per MIP setting (true batch above the reconstruction, matched) to --out.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from attacks.labels import LabelStrategyError, strategy_labels
from fedsim.config import RunConfig
from fedsim.evaluate import label_accuracy
from fedsim.harness import Setting
from fedsim.report import save_grid

SETTINGS = {  # name -> RunConfig fields
    "mip-adapter": dict(peft="adapter", attack="mip"),
    "mip-coop-4": dict(peft="coop", n_ctx=4, attack="mip"),
    "mip-coop-8": dict(peft="coop", n_ctx=8, attack="mip"),
    "ig-convnet": dict(model="convnet", peft="full", attack="ig", attack_iters=300),
}
RULES = ("gradinversion", "ilrg")  # label rules, on the ConvNet's updates of the same batches
BATCHES, STEPS = (1, 2, 4, 8, 16), (1, 2, 5, 10)
STEP_SETTINGS = ("mip-adapter", "mip-coop-4")
COLUMNS = ("label_acc", "mse", "psnr", "ssim", "lpips", "ident_pixel", "ident_feature", "emb_cos", "emb_cos_centred",
           "update_numbers", "unknowns", "seconds", *(f"{rule}_label_acc" for rule in RULES))
FIELDS = ("setting", "batch", "steps", "client", *COLUMNS)  # results.csv, in this order whatever the cell


def cells(args) -> list[tuple[str, int, int]]:
    """(setting, batch, local steps): the batch sweep under FedSGD, then the local-steps sweep."""
    out = [(s, b, 0) for s in args.settings for b in args.batches]
    out += [(s, 1, t) for s in args.settings if s in STEP_SETTINGS for t in args.steps]
    return out


def setting_for(name: str, batch: int, steps: int, clients: int, seed: int) -> Setting:
    protocol = dict(protocol="fedavg", local_steps=steps) if steps else {}
    return Setting(RunConfig(clients=clients, batch_size=batch, seed=seed, model_seed=seed, attack_seed=seed,
                             **SETTINGS[name], **protocol), device="cpu")


def attack_cell(name: str, batch: int, steps: int, clients: int, seed: int, grids: Path | None):
    setting = setting_for(name, batch, steps, clients, seed)
    attack, scorer = setting.attack(), setting.scorer()
    for client in range(clients):
        obs, truth = setting.observe(1, client)
        start = time.perf_counter()
        recon = attack.reconstruct(obs, setting.task)
        seconds = time.perf_counter() - start
        metrics, order = scorer.score(obs, recon, truth)
        row = {"setting": name, "batch": batch, "steps": steps, "client": client, **metrics,
               **{k: recon.extras.get(k) for k in ("update_numbers", "unknowns")}, "seconds": seconds}
        if name == "ig-convnet":
            for rule in RULES:
                try:
                    row[f"{rule}_label_acc"] = label_accuracy(strategy_labels(rule, obs, setting.task), truth.labels)
                except LabelStrategyError:
                    row[f"{rule}_label_acc"] = float("nan")
        if grids is not None and client == 0 and batch == 8 and not steps:
            save_grid(grids / f"{name}_batch8.png", [(truth.images, truth.labels),
                                                    (recon.images[order], recon.labels[order])],
                      setting.knowledge.class_names)
        yield row


def plot(summary: pd.DataFrame, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    for sweep, x, path in (("batch", "batch", out / "batch.png"), ("steps", "steps", out / "steps.png")):
        part = summary[summary["steps"] == 0] if sweep == "batch" else summary[summary["steps"] > 0]
        if part.empty:
            continue
        fig, axes = plt.subplots(1, 3, figsize=(15, 4))
        colour = {name: f"C{i}" for i, name in enumerate([*SETTINGS, *RULES])}  # the same in every panel
        for name, group in part.groupby("setting"):
            group = group.sort_values(x)
            axes[0].plot(group[x], group["psnr"], marker="o", label=name, color=colour[name])
            axes[1].plot(group[x], 100 * group["label_acc"], marker="o", label=name, color=colour[name])
            axes[2].plot(group[x], 100 * group["ident_feature"], marker="o", label=name, color=colour[name])
            fedsgd = summary[(summary["setting"] == name) & (summary["batch"] == 1) & (summary["steps"] == 0)]
            if sweep == "steps" and not fedsgd.empty:  # the reference the local steps are measured against
                axes[0].axhline(float(fedsgd["psnr"].iloc[0]), ls=":", color=colour[name], label=f"{name}, FedSGD")
            for rule in RULES:
                if f"{rule}_label_acc" in group and group[f"{rule}_label_acc"].notna().any():
                    axes[1].plot(group[x], 100 * group[f"{rule}_label_acc"], ls="--", marker=".",
                                 label=f"{rule} (ConvNet)", color=colour[rule])
        for ax, label in zip(axes, ("median PSNR (dB)", "label accuracy (%)",
                                    "identified by features (%)")):
            ax.set_xscale("log", base=2)
            ax.set_xlabel("batch size" if sweep == "batch" else "FedAvg local steps (batch 1)")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3)
        axes[0].set_ylim(0, axes[0].get_ylim()[1] + 2)  # from zero: a 0.3 dB wobble should look like one
        for ax in axes[1:]:
            ax.set_ylim(-5, 105)
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--batches", type=int, nargs="+", default=list(BATCHES))
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEPS))
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="2 clients, batches 1 and 8, steps 1 and 5")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default="runs/batches")
    args = parser.parse_args()
    if args.quick:
        args.clients, args.batches, args.steps = 2, [1, 8], [1, 5]
        args.settings = [s for s in args.settings if s != "mip-coop-8"]
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    table = out / "results.csv"
    done = pd.read_csv(table) if table.exists() and table.stat().st_size else pd.DataFrame()
    finished = set() if done.empty else {tuple(k) for k in done[["setting", "batch", "steps"]].drop_duplicates()
                                         .itertuples(index=False)}
    for name, batch, steps in cells(args):
        if (name, batch, steps) in finished:
            continue
        rows = list(attack_cell(name, batch, steps, args.clients, args.seed, out))
        cell = pd.DataFrame(rows).reindex(columns=list(FIELDS))
        cell.to_csv(table, mode="a", header=not table.exists() or not table.stat().st_size, index=False)
        print(f"{name} batch {batch}" + (f", {steps} local steps" if steps else "") + ": "
              + ", ".join(f"{c} {cell[c].median():.3g}" for c in ("label_acc", "psnr", "ident_pixel", "seconds")
                          if c in cell), flush=True)
    results = pd.read_csv(table)
    summary = results.groupby(["setting", "batch", "steps"])[list(COLUMNS)].median().reset_index()
    shares = ["label_acc", "ident_pixel", "ident_feature", *(f"{rule}_label_acc" for rule in RULES)]
    means = results.groupby(["setting", "batch", "steps"])[shares].mean().reset_index()
    summary[shares] = means[shares]  # shares of images: means over clients, not medians
    summary.to_csv(out / "summary.csv", index=False)
    plot(summary, out)
    print(summary.to_string(index=False))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
