"""Classic optimisation attacks at batch 1, 32 px: DLG on LeNet and Inverting Gradients on the ConvNet.

Each image is one client's FedSGD gradient, produced by the real client code path and scored
by the real evaluator (the harness: `Setting.observe`, `Scorer.score`, which also reports
identifiability against the public gallery); half the images are digits, half photo crops
(`--dataset photos`). Settings (`--part`):
- dlg: DLG on the DLG paper's LeNet, labels not given (soft labels optimised).
  Target: median PSNR >= 30 dB over 20 images.
- ig: Inverting Gradients on fedsim's ConvNet (random init, classifier on the flattened feature
  map), labels by iDLG's rule, once per value of --restarts. Target: median PSNR >= 18 dB over 20 images at
  2,000 iterations; R = 8 restarts not worse than R = 1.
Diagnostics for ig (not issue numbers): `--width W` (fedsim's ConvNet has 32) and
`--head avg`, a ConvNet whose classifier reads the global average of the feature map instead of
the flattened map (fedsim's ConvNet did until IG on it was found to reach only ~10 dB). These
models are not fedsim models: they take the place of the setting's task, and the same client
code (FedSGD, no defense: `Task.gradients`) computes their gradient; `--tv` and `--lr` change
IG's weights. `--seed` seeds the data, the model's initialisation and the attack, as before.

Writes results.csv (one row per image and setting; grey_psnr is the PSNR of a uniform grey
image, the floor a reconstruction must beat), grid_<setting>_<dataset>.png (true images on
top, reconstructions below, each dataset's class names) and psnr.png (PSNR per image for
every setting, medians marked), and prints medians and the cost per iteration. Runs on one CPU thread.

    PYTHONPATH=. .venv/bin/python experiments/classic_attacks.py --part dlg --out runs/classic_dlg
    PYTHONPATH=. .venv/bin/python experiments/classic_attacks.py --part ig --restarts 1 \\
        --out runs/classic_ig_r1
    PYTHONPATH=. .venv/bin/python experiments/classic_attacks.py --part ig --restarts 8 \\
        --images-per-dataset 3 --out runs/classic_ig_r8
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

from attacks.ig import InvertingGradients  # noqa: E402
from fedsim.config import RunConfig  # noqa: E402
from fedsim.evaluate import evaluate  # noqa: E402
from fedsim.harness import Setting  # noqa: E402
from fedsim.models import derive_seed  # noqa: E402
from fedsim.models.classic import ConvNet  # noqa: E402
from fedsim.report import save_grid  # noqa: E402
from fedsim.task import Task  # noqa: E402

TARGETS = {"dlg": 30.0, "ig": 18.0}
MODELS = {"dlg": "lenet", "ig": "convnet"}


def convnet_variant(num_classes: int, seed: int, width: int, head: str) -> nn.Module:
    """fedsim's ConvNet at another width, or with global average pooling before the classifier
    (head "avg"), which then sees 4w channel means instead of the [4w, 8, 8] feature map."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = ConvNet(num_classes, width=width)
        if head == "avg":
            model.features.append(nn.AdaptiveAvgPool2d(1))
            model.fc = nn.Linear(4 * width, num_classes)
    return model.eval()


def make_setting(part: str, dataset: str, images: int, seed: int, width: int = 32, head: str = "flat") -> Setting:
    """One client per image, on CPU; for the ig diagnostics the ConvNet variant replaces the task."""
    cfg = RunConfig(clients=images, model=MODELS[part], peft="full", dataset=dataset, image_size=32, seed=seed,
                    model_seed=seed, attack=part, attack_seed=seed)
    s = Setting(cfg, device="cpu")
    if part == "ig" and (width != 32 or head != "flat"):
        classes, init_seed = len(s.knowledge.class_names), derive_seed(cfg.model_seed, "model")  # as fedsim's models
        model = convnet_variant(classes, init_seed, width, head)
        s.task = Task(model, classes, (3, 32, 32))
    return s


def make_attack(s: Setting, part: str, iterations: int, restarts: int, tv: float, lr: float):
    """DLG as `fedsim run` builds it; IG with its TV weight and step size, which are not run options."""
    if part == "dlg":
        return s.attack(attack_iters=iterations, attack_restarts=restarts)
    return InvertingGradients(iterations=iterations, restarts=restarts, seed=s.knowledge.attack_seed, tv=tv, lr=lr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", default="dlg", choices=["dlg", "ig"])
    parser.add_argument("--images-per-dataset", type=int, default=10)
    parser.add_argument("--datasets", nargs="+", default=["digits", "photos"])
    parser.add_argument("--iterations", type=int, default=None, help="default: dlg 100, ig 2000")
    parser.add_argument("--restarts", type=int, nargs="+", default=None, help="default: dlg 1, ig 1 8")
    parser.add_argument("--tv", type=float, default=1e-4, help="IG's TV weight (paper recipe: 1e-4)")
    parser.add_argument("--lr", type=float, default=0.1, help="IG's Adam learning rate (normalised units)")
    parser.add_argument("--width", type=int, default=32, help="ig diagnostic: ConvNet width (fedsim: 32)")
    parser.add_argument("--head", default="flat", choices=["flat", "avg"],
                        help="ig diagnostic: avg = classifier on the global average of the feature map")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/classic_attacks")
    args = parser.parse_args()
    torch.set_num_threads(1)
    iterations = args.iterations or (100 if args.part == "dlg" else 2000)
    restarts = args.restarts or ([1] if args.part == "dlg" else [1, 8])
    labels_from = "iDLG rule (attacks.labels)" if args.part != "dlg" else "optimised (DLG)"
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = MODELS[args.part] if args.part == "dlg" else f"convnet width {args.width} head {args.head}"
    print(f"{args.part} on {model}: {iterations} iterations, restarts {restarts}, labels {labels_from}"
          + (f", tv {args.tv}, lr {args.lr}" if args.part == "ig" else ""), flush=True)

    rows, grids = [], {}
    for dataset in args.datasets:
        s = make_setting(args.part, dataset, args.images_per_dataset, args.seed, args.width, args.head)
        scorer, names = s.scorer(), s.knowledge.class_names
        for client in range(args.images_per_dataset):
            obs, truth = s.observe(1, client)
            labels = truth.labels
            for r in restarts:
                setting = f"{args.part} R={r}"
                start = time.perf_counter()
                recon = make_attack(s, args.part, iterations, r, args.tv, args.lr).reconstruct(obs, s.task)
                seconds = time.perf_counter() - start
                metrics, order = scorer.score(obs, recon, truth)
                weights = {"tv": args.tv, "lr": args.lr} if args.part == "ig" else {}
                grey = evaluate(torch.full_like(truth.images, 0.5), labels, truth.images, labels)[0]["psnr"]
                rows.append({"setting": setting, "attack": args.part, "model": model, **weights,
                             "restarts": r, "iterations": iterations,
                             "dataset": dataset, "client": obs.client, "label": int(labels[0]),
                             "predicted": int(recon.labels[0]), **metrics, "grey_psnr": grey,
                             "gradient_loss": recon.extras["gradient_loss"], "seconds": seconds,
                             "ms_per_iteration": 1000 * seconds / iterations})
                pair = grids.setdefault((setting, dataset), ([], [], names))
                pair[0].append((truth.images, labels))
                pair[1].append((recon.images[order], recon.labels[order]))
                print(f"{setting} {dataset} {obs.client}: PSNR {metrics['psnr']:.2f} dB, label "
                      f"{int(labels[0])} -> {int(recon.labels[0])}, {seconds:.1f}s", flush=True)
                save_outputs(out, rows, grids, TARGETS[args.part])  # partial results survive a kill

    results = pd.DataFrame(rows)
    for setting, g in results.groupby("setting", sort=False):
        print(f"{setting}: median PSNR {g['psnr'].median():.2f} dB over {len(g)} images "
              f"(digits {g[g.dataset == 'digits']['psnr'].median():.2f}, photos "
              f"{g[g.dataset == 'photos']['psnr'].median():.2f}; min {g['psnr'].min():.1f}, max "
              f"{g['psnr'].max():.1f}; grey image {g['grey_psnr'].median():.2f}); label accuracy "
              f"{g['label_acc'].mean():.0%}; "
              f"{g['ms_per_iteration'].median():.1f} ms/iteration; target {TARGETS[args.part]:.0f} dB")
    print(f"wrote {out}")


def save_outputs(out: Path, rows: list[dict], grids: dict, target: float) -> None:
    """results.csv, one grid per (setting, dataset) and psnr.png, from the images done so far."""
    results = pd.DataFrame(rows)
    results.to_csv(out / "results.csv", index=False)
    for (setting, dataset), (true_row, recon_row, names) in grids.items():
        cat = lambda pairs: (torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs]))  # noqa: E731
        name = f"grid_{setting.replace(' ', '_').replace('=', '')}_{dataset}.png"
        save_grid(out / name, [cat(true_row), cat(recon_row)], names)
    plot(results, out / "psnr.png", target)


def plot(results: pd.DataFrame, path: Path, target: float) -> None:
    settings = list(dict.fromkeys(results["setting"]))
    fig, ax = plt.subplots(figsize=(1.8 + 1.6 * len(settings), 3.2))
    for i, setting in enumerate(settings):
        for j, (dataset, g) in enumerate(results[results.setting == setting].groupby("dataset")):
            xs = [i + 0.15 * (2 * j - 1)] * len(g)
            ax.scatter(xs, g["psnr"], s=14, alpha=0.7, label=dataset if i == 0 else None,
                       color=f"C{j}")
        ax.hlines(statistics.median(results[results.setting == setting]["psnr"]), i - 0.3, i + 0.3, color="k")
    ax.axhline(target, color="r", ls="--", lw=1, label=f"target {target:.0f} dB")
    ax.set_xticks(range(len(settings)), settings)
    ax.set_ylabel("PSNR (dB)")
    ax.set_xlim(-0.6, len(settings) - 0.4)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
