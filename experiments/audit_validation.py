"""I2F's predicted error against DLG's measured error on the same images, across noise levels.

The paper's setting (Zhang et al., NeurIPS 2023, arXiv 2309.13016, Fig. 1): DLG's LeNet (sigmoid,
U(-0.5, 0.5)), batch 1, 32x32 digits, Gaussian noise of std `level` added to every entry of the
observed gradient (update level, FedSGD). For each image and level one noise draw delta is added to
the clean Observation's update; DLG (fedsim's, labels not given) attacks that Observation and the
Scorer measures its RMSE (sqrt of the matched MSE); I2F (fedsim.audit.i2f) predicts the error for
the very same delta at the true image. Reports Spearman's rho between predicted and measured RMSE
over all (image, level) pairs, and within each level across images (the harder question: which
images leak more at the same noise), writes results.csv and scatter.png.

    .venv/bin/python experiments/audit_validation.py --images 4 --iterations 50 --out runs/audit_validation
    .venv/bin/python experiments/audit_validation.py --images 20   # the full check (~1 h on 2 busy cores)

Target (issue 16): rho >= 0.8 for DLG on LeNet.
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import pandas as pd
import torch

from fedsim.audit import i2f
from fedsim.config import RunConfig
from fedsim.harness import Setting
from fedsim.models import derive_seed
from fedsim.observation import Observation

LEVELS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)


def noisy(obs: Observation, delta: dict[str, torch.Tensor]) -> Observation:
    """The observation with delta added to its update (FedSGD: the update is the gradient)."""
    return Observation(**{**obs.meta(), "update": {n: u + delta[n] for n, u in obs.update.items()},
                          "global_params": obs.global_params})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4, help="images (clients), 20 for the full check")
    parser.add_argument("--levels", type=float, nargs="+", default=list(LEVELS), help="noise std per entry")
    parser.add_argument("--iterations", type=int, default=50, help="DLG L-BFGS steps (its default: 300)")
    parser.add_argument("--restarts", type=int, default=1)
    parser.add_argument("--rel-damping", type=float, default=1e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared machine)")
    parser.add_argument("--out", default="runs/audit_validation")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from scipy.stats import spearmanr

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    setting = Setting(RunConfig(clients=args.images, model="lenet", peft="full", attack="dlg",
                                attack_iters=args.iterations, attack_restarts=args.restarts,
                                seed=args.seed, model_seed=args.seed, attack_seed=args.seed), device="cpu")
    attack, scorer = setting.attack(), setting.scorer()
    rows, begin = [], time.perf_counter()
    for client in range(args.images):
        obs, truth = setting.observe(1, client)
        grad_norm = math.sqrt(sum(float(u.pow(2).sum()) for u in obs.update.values()))
        for level in args.levels:
            gen = torch.Generator().manual_seed(derive_seed(args.seed, client, level, "audit-validation"))
            delta = {n: level * torch.randn(u.shape, generator=gen) for n, u in obs.update.items()}
            start = time.perf_counter()
            pred = i2f(setting.task, obs.global_params, truth.images, truth.labels, delta,
                       rel_damping=args.rel_damping)
            i2f_s = time.perf_counter() - start
            start = time.perf_counter()
            recon = attack.reconstruct(noisy(obs, delta), setting.task)
            metrics, _ = scorer.score(obs, recon, truth)
            rows.append({"client": client, "label": int(truth.labels[0]), "level": level, "grad_norm": grad_norm,
                         "i2f": pred["i2f"], "i2f_lb": pred["i2f_lb"], "rmse_pred": pred["rmse_pred"],
                         "psnr_pred": pred["psnr_pred"], "reliable": pred["reliable"], "cg_iters": pred["cg_iters"],
                         "rmse": math.sqrt(metrics["mse"]), "psnr": metrics["psnr"],
                         "gradient_loss": recon.extras.get("gradient_loss"),
                         "i2f_seconds": i2f_s, "attack_seconds": time.perf_counter() - start})
            r = rows[-1]
            print(f"image {client} level {level:g}: predicted RMSE {r['rmse_pred']:.4f} (lb "
                  f"{r['i2f_lb'] / math.sqrt(truth.images.numel()):.2e}), DLG RMSE {r['rmse']:.4f} "
                  f"({r['psnr']:.1f} dB), {r['i2f_seconds']:.1f}s + {r['attack_seconds']:.1f}s", flush=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "results.csv", index=False)
    rho = spearmanr(frame["rmse_pred"], frame["rmse"]).statistic
    rho_lb = spearmanr(frame["i2f_lb"], frame["rmse"]).statistic
    within = {level: spearmanr(g["rmse_pred"], g["rmse"]).statistic if len(g) > 2 else math.nan
              for level, g in frame.groupby("level")}
    plot(frame, out / "scatter.png", rho)
    elapsed = time.perf_counter() - begin
    print(f"Spearman rho(I2F, DLG RMSE) = {rho:.3f} over {len(frame)} (image, level) pairs "
          f"(lower bound: {rho_lb:.3f}); within levels: "
          + ", ".join(f"{lv:g}: {r:.2f}" for lv, r in within.items())
          + f"; {elapsed:.0f}s; wrote {out}")


def plot(frame: pd.DataFrame, path: Path, rho: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4.5))
    points = ax.scatter(frame["rmse_pred"], frame["rmse"], c=frame["level"].map(math.log10), cmap="viridis")
    fig.colorbar(points, label="log10 noise std")
    ax.set_xscale("log")
    ax.set_yscale("log")
    lo = min(frame["rmse_pred"].min(), frame["rmse"].min())
    hi = max(frame["rmse_pred"].max(), frame["rmse"].max())
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="y = x")
    ax.set_xlabel("I2F predicted RMSE")
    ax.set_ylabel("DLG measured RMSE")
    ax.set_title(f"I2F vs DLG on LeNet, Spearman rho = {rho:.2f}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
