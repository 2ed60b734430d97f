"""I2F's predicted error against an attack's measured error on the same images, across noise levels.

For each setting, image (one client's batch of 1) and noise level, one draw delta of Gaussian noise
(std `level` on every entry of the observed gradient, update level, FedSGD) is added to the clean
Observation's update; the attack reconstructs from that Observation and the Scorer measures its
error; I2F (fedsim.audit.i2f) predicts the error for the very same delta at the true input.

Settings (issue 16):
- dlg-lenet: the paper's (Zhang et al., NeurIPS 2023, arXiv 2309.13016, Fig. 1): DLG's LeNet
  (sigmoid, U(-0.5, 0.5)), fedsim's DLG (labels not given); absolute levels 1e-4 .. 1e-2.
- ig-convnet: Inverting Gradients on fedsim's ConvNet (ReLU, BatchNorm, PyTorch's init).
- mip-adapter, mip-coop: MIP on the tiny pre-trained CLIP. Two predictions: pixels (I2F through the
  image tower) and the embedding (I2F w.r.t. the tower's output, where MIP's step 2 lives); two
  measurements: MIP's recovered tower-output direction against the true one (the chord between
  unit vectors, comparable to I2F's relative error `rel_error`) and the picture's RMSE/PSNR.
Levels of the last three are multiples of the clean gradients' median RMS entry (the gradients'
scales differ by orders of magnitude between models), the same absolute std for every image.

Reports Spearman's rho between prediction and measurement over all (image, level) pairs, and within
each level across images (which images leak more at the same noise); per class at one level (the
paper's Fig. 2: unequal risk across images and classes); writes results.csv, scatter.png, summary.json.

    .venv/bin/python experiments/audit_validation.py --setting dlg-lenet --images 20
    .venv/bin/python experiments/audit_validation.py --setting mip-coop --images 20
    .venv/bin/python experiments/audit_validation.py --setting dlg-lenet --images 4 --iterations 30  # quick

Target (issue 16): rho >= 0.8 for DLG on LeNet.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

from fedsim.audit import i2f
from fedsim.config import RunConfig
from fedsim.harness import Setting
from fedsim.models import derive_seed
from fedsim.observation import Observation

SETTINGS = {  # RunConfig fields, default levels, whether levels are multiples of the gradient's RMS, spaces
    "dlg-lenet": (dict(model="lenet", peft="full", attack="dlg", attack_iters=100),
                  (1e-4, 3e-4, 1e-3, 3e-3, 1e-2), False, ("pixels",)),
    "ig-convnet": (dict(model="convnet", peft="full", attack="ig", attack_iters=500),
                   (0.01, 0.03, 0.1, 0.3, 1.0), True, ("pixels",)),
    "mip-adapter": (dict(peft="adapter", attack="mip"), (0.003, 0.01, 0.03, 0.1, 0.3), True, ("embedding", "pixels")),
    "mip-coop": (dict(peft="coop", attack="mip"), (0.003, 0.01, 0.03, 0.1, 0.3), True, ("embedding", "pixels")),
}


def noisy(obs: Observation, delta: dict[str, torch.Tensor]) -> Observation:
    """The observation with delta added to its update (FedSGD: the update is the gradient)."""
    return Observation(**{**obs.meta(), "update": {n: u + delta[n] for n, u in obs.update.items()},
                          "global_params": obs.global_params})


def rms(update: dict[str, torch.Tensor]) -> float:
    return math.sqrt(sum(float(u.pow(2).sum()) for u in update.values()) / sum(u.numel() for u in update.values()))


def tower_direction(setting: Setting, images: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return F.normalize(setting.task.model.encode_image(images.to(setting.task.device)).float(), dim=-1).cpu()


def validate(name: str, images: int, levels, iterations: int | None, seed: int, rel_damping: float,
             init: str | None = None) -> pd.DataFrame:
    """One row per (image, level) of a setting: predictions per space and the attack's measured error."""
    fields, default_levels, relative, spaces = SETTINGS[name]
    fields = {**fields, **({"attack_iters": iterations} if iterations else {})}
    setting = Setting(RunConfig(clients=images, seed=seed, model_seed=seed, attack_seed=seed, **fields), device="cpu")
    if init:
        reinitialise(setting.task.model, init, seed)
    attack, scorer = setting.attack(), setting.scorer()
    clean = [setting.observe(1, client) for client in range(images)]
    scale = statistics.median(rms(obs.update) for obs, _ in clean) if relative else 1.0
    rows = []
    for client, (obs, truth) in enumerate(clean):
        true_direction = tower_direction(setting, truth.images) if "embedding" in spaces else None
        for level in levels or default_levels:
            gen = torch.Generator().manual_seed(derive_seed(seed, client, level, "audit-validation"))
            delta = {n: level * scale * torch.randn(u.shape, generator=gen) for n, u in obs.update.items()}
            row = {"setting": name, "init": init or "default", "client": client, "label": int(truth.labels[0]),
                   "level": level, "std": level * scale, "grad_rms": rms(obs.update)}
            for space in spaces:
                pred = i2f(setting.task, obs.global_params, truth.images, truth.labels, delta, space=space,
                           rel_damping=rel_damping)
                row.update({f"{space}_{key}": pred[key] for key in ("i2f", "i2f_lb", "rmse_pred", "rel_error",
                                                                    "psnr_pred", "reliable", "cg_iters", "seconds")})
            start = time.perf_counter()
            recon = attack.reconstruct(noisy(obs, delta), setting.task)
            row["attack_seconds"] = time.perf_counter() - start
            metrics, _ = scorer.score(obs, recon, truth)
            row.update(rmse=math.sqrt(metrics["mse"]), psnr=metrics["psnr"], label_ok=metrics["label_acc"])
            if true_direction is not None and "features" in recon.extras:
                row["emb_err"] = float((recon.extras["features"][:1] - true_direction).norm())
            rows.append(row)
            print(f"{name} image {client} level {level:g}: "
                  + ", ".join(f"{s} predicted {row[f'{s}_rel_error']:.3g} rel" for s in spaces)
                  + f"; measured RMSE {row['rmse']:.4f} ({row['psnr']:.1f} dB)"
                  + (f", embedding error {row['emb_err']:.3f}" if "emb_err" in row else "")
                  + f"; {sum(row[f'{s}_seconds'] for s in spaces):.1f}s + {row['attack_seconds']:.1f}s", flush=True)
    return pd.DataFrame(rows)


def reinitialise(model: torch.nn.Module, scheme: str, seed: int) -> None:
    """The paper's Fig. 3 schemes on every weight (biases too for uniform/normal, as DLG's code does)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if scheme == "uniform":
                p.copy_(torch.rand(p.shape, generator=gen) - 0.5)
            elif scheme == "normal":
                p.copy_(torch.randn(p.shape, generator=gen))
            elif p.dim() < 2:
                p.zero_()
            elif scheme == "kaiming":
                torch.nn.init.kaiming_normal_(p, generator=gen)
            elif scheme == "xavier":
                torch.nn.init.xavier_normal_(p, generator=gen)
            else:
                raise ValueError(f"unknown init {scheme!r}; valid: uniform, normal, kaiming, xavier")


PAIRS = {  # (prediction column, measurement column, label) per space
    "pixels": [("pixels_rmse_pred", "rmse", "pixel I2F vs RMSE")],
    "embedding": [("embedding_rel_error", "emb_err", "embedding I2F vs embedding error"),
                  ("embedding_rel_error", "rmse", "embedding I2F vs RMSE")],
}


def correlations(frame: pd.DataFrame) -> dict[str, dict[str, float]]:
    """Spearman's rho over all pairs and the median of the within-level rhos, per (prediction,
    measurement) pair present; the pixel I2F against the embedding error for MIP too."""
    from scipy.stats import spearmanr

    pairs = [p for space, ps in PAIRS.items() if f"{space}_i2f" in frame for p in ps if p[1] in frame]
    if "emb_err" in frame and "pixels_rmse_pred" in frame:
        pairs.append(("pixels_rmse_pred", "emb_err", "pixel I2F vs embedding error"))
    out = {}
    for pred, meas, label in pairs:
        within = [spearmanr(g[pred], g[meas]).statistic for _, g in frame.groupby("level") if len(g) > 2]
        out[label] = {"rho": float(spearmanr(frame[pred], frame[meas]).statistic),
                      "rho_within_level_median": float(statistics.median(within)) if within else math.nan,
                      "pairs": len(frame)}
    return out


def per_class(frame: pd.DataFrame, level: float, pred: str) -> pd.DataFrame:
    """Medians per class at one level: measured RMSE and predicted, with each one's rank."""
    at = frame[frame["level"] == level]
    table = at.groupby("label")[["rmse", pred]].median()
    table["images"] = at.groupby("label").size()
    return table


def plot(frame: pd.DataFrame, path: Path, stats: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [(p, m, label) for space, ps in PAIRS.items() for p, m, label in ps if p in frame and m in frame]
    fig, axes = plt.subplots(1, len(pairs), figsize=(5 * len(pairs), 4.5), squeeze=False)
    for ax, (pred, meas, label) in zip(axes[0], pairs):
        points = ax.scatter(frame[pred], frame[meas], c=frame["level"].map(math.log10), cmap="viridis", s=14)
        fig.colorbar(points, ax=ax, label="log10 noise level")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel(pred.replace("_", " "))
        ax.set_ylabel(meas)
        ax.set_title(f"{frame['setting'].iloc[0]}: {label}\nSpearman rho = {stats[label]['rho']:.2f}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--setting", choices=sorted(SETTINGS), default="dlg-lenet")
    parser.add_argument("--images", type=int, default=4, help="images (clients), 20 for the full check")
    parser.add_argument("--levels", type=float, nargs="+", default=None,
                        help="noise std per entry (dlg-lenet) or multiples of the gradient's RMS (the others)")
    parser.add_argument("--iterations", type=int, default=None, help="attack iterations (default: the setting's)")
    parser.add_argument("--inits", nargs="*", default=None,
                        help="also run under these inits (uniform normal kaiming xavier): the paper's Fig. 3")
    parser.add_argument("--init-level", type=float, default=None, help="the one level of the init comparison")
    parser.add_argument("--rel-damping", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument("--out", default=None, help="default runs/audit_validation/SETTING")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    out = Path(args.out or f"runs/audit_validation/{args.setting}")
    out.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    frame = validate(args.setting, args.images, args.levels, args.iterations, args.seed, args.rel_damping)
    frame.to_csv(out / "results.csv", index=False)
    stats = {"correlations": correlations(frame)}
    space = SETTINGS[args.setting][3][-1]
    mid = sorted(frame["level"].unique())[len(frame["level"].unique()) // 2]
    classes = per_class(frame, mid, f"{space}_rmse_pred")
    stats["per_class"] = {"level": mid, "table": classes.reset_index().to_dict("records"),
                          "measured_max_over_min": float(classes["rmse"].max() / classes["rmse"].min()),
                          "images_max_over_min": float(frame[frame["level"] == mid]["rmse"].max()
                                                       / frame[frame["level"] == mid]["rmse"].min())}
    seconds = frame[[c for c in frame if c.endswith("_seconds") and c != "attack_seconds"]].sum(axis=1)
    stats["seconds"] = {"i2f_median": float(seconds.median()), "attack_median": float(frame["attack_seconds"].median())}
    plot(frame, out / "scatter.png", stats["correlations"])
    if args.inits:
        level = args.init_level or mid
        inits = pd.concat([validate(args.setting, args.images, [level], args.iterations, args.seed,
                                    args.rel_damping, init) for init in args.inits])
        inits.to_csv(out / "inits.csv", index=False)
        stats["inits"] = inits.groupby("init")[["rmse", f"{space}_rmse_pred"]].median().reset_index().to_dict("records")
    stats["seconds"]["total"] = time.perf_counter() - begin
    (out / "summary.json").write_text(json.dumps(stats, indent=1, default=float))
    for label, c in stats["correlations"].items():
        print(f"{args.setting}: {label}: Spearman rho {c['rho']:.3f} over {c['pairs']} pairs, "
              f"median within a level {c['rho_within_level_median']:.2f}")
    print(f"per class at level {mid:g} (measured RMSE max/min {stats['per_class']['measured_max_over_min']:.2f}, "
          f"across images {stats['per_class']['images_max_over_min']:.2f}):\n{classes.to_string()}")
    for row in stats.get("inits", []):
        print(f"init {row['init']}: median measured RMSE {row['rmse']:.4f}, predicted {row[f'{space}_rmse_pred']:.4f}")
    print(f"median seconds: I2F {stats['seconds']['i2f_median']:.2f}, attack {stats['seconds']['attack_median']:.2f}; "
          f"total {stats['seconds']['total']:.0f}s; wrote {out}")


if __name__ == "__main__":
    main()
