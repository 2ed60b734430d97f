"""report.html: one self-contained page per run and per sweep (images and plots inline, no
network request), rendered from jinja2 templates (fedsim/templates/) with matplotlib plots.

A page is built from what a run or sweep leaves on disk (config.yaml, results.csv, metrics.csv,
timings.json, reconstructions/, observations/; a sweep's results.parquet and trials/), so
`fedsim report DIR` rebuilds it for any run or sweep directory, older ones included.
"""

from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path
from typing import Any

import jinja2
import pandas as pd
import yaml

from fedsim.options import declared
from fedsim.report import budget_line

PAGE = "report.html"
NOT_RECONSTRUCTED = {"failed": "attack failed", "invalid": "not attacked", "timeout": "timed out"}  # row statuses
METRIC_COLUMNS = (("label_acc", "labels", "{:.0%}"), ("psnr", "PSNR dB", "{:.1f}"), ("ssim", "SSIM", "{:.3f}"),
                  ("lpips", "LPIPS", "{:.3f}"), ("ident_pixel", "identified", "{:.0%}"),
                  ("seconds", "seconds", "{:.1f}"))


def environment() -> jinja2.Environment:
    env = jinja2.Environment(loader=jinja2.PackageLoader("fedsim", "templates"), autoescape=True,
                             undefined=jinja2.StrictUndefined)
    env.filters["fmt"] = fmt
    return env


def fmt(value: Any, spec: str = "{:.3g}") -> str:
    """A number for a page: '-' for a missing one, infinity spelled out."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "∞"
    return spec.format(value)


def png_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(Path(path).read_bytes()).decode()


def figure_uri(figure) -> str:
    """A matplotlib figure as an inline PNG, closed afterwards."""
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def read_csv(path: Path) -> pd.DataFrame:
    return pd.read_csv(path) if path.exists() and path.stat().st_size else pd.DataFrame()


# ---------------------------------------------------------------------------------------- a run


def summary_rows(results: pd.DataFrame) -> list[dict[str, Any]]:
    """Per (attack, defense): successful attacks / all and the median of every metric."""
    rows = []
    for (attack, defense), group in results.groupby(["attack", "defense"], sort=False, dropna=False):
        ok = group[group["status"] == "ok"]
        cells = {label: fmt(ok[col].mean() if col == "ident_pixel" else ok[col].median(), spec)
                 for col, label, spec in METRIC_COLUMNS if col in ok}
        rows.append({"attack": attack, "defense": defense, "ok": f"{len(ok)}/{len(group)}", **cells})
    return rows


def shared_numbers(out: Path) -> tuple[int, dict[str, list[int]]] | None:
    """(numbers in one client's update, shape of each tensor) from a saved observation, of any
    format version (read safely, tensors only); None when there is none or it cannot be read."""
    import torch

    saved = sorted((out / "observations").glob("*.pt"))
    try:
        update = torch.load(saved[0], map_location="cpu", weights_only=True)["update"]
        return sum(t.numel() for t in update.values()), {n: list(t.shape) for n, t in update.items()}
    except (IndexError, KeyError, TypeError, RuntimeError, OSError, ValueError, AttributeError):
        return None


def accuracy_plot(metrics: pd.DataFrame) -> str | None:
    if metrics.empty or "accuracy" not in metrics:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 2.8))
    ax.plot(metrics["round"], 100 * metrics["accuracy"], marker="o", color="#1f6feb", label="global accuracy")
    ax.set_xlabel("round (0 = before training)")
    ax.set_ylabel("accuracy on held-out public data (%)")
    ax.set_ylim(0, 100)
    for column, style in (("epsilon", "example-level ε"), ("epsilon_client", "client-level ε")):
        if column in metrics and metrics[column].notna().any():
            twin = ax.twinx()
            twin.plot(metrics["round"], metrics[column], marker="s", color="#cf222e", label=style)
            twin.set_ylabel(style, color="#cf222e")
    ax.grid(alpha=0.3)
    return figure_uri(fig)


def audit_context(audit: pd.DataFrame, results: pd.DataFrame) -> dict[str, Any] | None:
    """The I2F audit (`fedsim audit`, audit.csv) of a run directory: per client, with the error the
    run's attack measured on the same client and round where there is one; per class; Spearman's
    rho between predicted and measured error when at least 3 clients have both."""
    needed = {"round", "client", "label", "space", "i2f", "rel_error", "rmse_pred", "psnr_pred", "reliable",
              "perturbation"}
    if audit.empty or not needed <= set(audit):  # none, or not an audit.csv fedsim wrote: show the rest
        return None
    from fedsim.audit import summary

    merged = audit
    ok = results[results["status"] == "ok"] if "status" in results else results.iloc[0:0]
    if len(ok) and {"round", "client", "mse", "psnr"} <= set(ok):
        measured = ok[["round", "client", "psnr"]].assign(rmse=ok["mse"] ** 0.5)
        merged = audit.merge(measured, on=["round", "client"], how="left")
    has_measured = "rmse" in merged and merged["rmse"].notna().sum() >= 3
    rho = None
    if has_measured:
        from scipy.stats import spearmanr

        both = merged.dropna(subset=["rmse", "rel_error"])
        rho = float(spearmanr(both["rel_error"], both["rmse"]).statistic)
    per_class = summary(audit)["per_class"].reset_index()
    rows = [{"round": int(r["round"]), "client": int(r["client"]), "label": int(r["label"]), "space": r["space"],
             "i2f": fmt(r["i2f"], "{:.4g}"), "rel_error": fmt(r["rel_error"], "{:.3g}"),
             "rmse_pred": fmt(r["rmse_pred"], "{:.4f}"), "psnr_pred": fmt(r["psnr_pred"], "{:.1f}"),
             "reliable": bool(r["reliable"]), "psnr": fmt(r.get("psnr"), "{:.1f}")}
            for _, r in merged.sort_values(["round", "client"]).iterrows()]
    return {"rows": rows, "measured": "psnr" in merged, "rho": rho, "pairs": int(merged["rmse"].notna().sum())
            if "rmse" in merged else 0, "perturbation": str(audit["perturbation"].iloc[0]),
            "reliable": float(audit["reliable"].mean()),
            "per_class": [{"space": r["space"], "label": int(r["label"]), "clients": int(r["clients"]),
                           "i2f": fmt(r["i2f"], "{:.4g}"), "rmse_pred": fmt(r["rmse_pred"], "{:.4f}"),
                           "psnr_pred": fmt(r["psnr_pred"], "{:.1f}")} for _, r in per_class.iterrows()],
            "plot": audit_plot(merged, has_measured)}


def audit_plot(merged: pd.DataFrame, has_measured: bool) -> str:
    """Predicted relative error per class (median, with every client as a dot): which classes the
    defense protects least; beside it, predicted against measured error when the run has both."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if has_measured else 1, figsize=(10 if has_measured else 5.5, 3), squeeze=False)
    ax = axes[0][0]
    classes = sorted(merged["label"].unique())
    for i, c in enumerate(classes):  # every client a dot, the class's median a bar across (log axis: no bars)
        values = merged.loc[merged["label"] == c, "rel_error"]
        ax.plot([i] * len(values), values, "o", color="#1f6feb", ms=4, alpha=0.7)
        ax.plot([i - 0.3, i + 0.3], [values.median()] * 2, color="#0b3d91", lw=2)
    ax.set_xticks(range(len(classes)), [str(c) for c in classes])
    ax.set_yscale("log")
    ax.set_xlabel("client's main class")
    ax.set_ylabel("predicted error / |input|")
    ax.set_title("I2F: smaller = leaks more")
    if has_measured:
        ax = axes[0][1]
        ax.scatter(merged["rel_error"], merged["rmse"], color="#cf222e", s=14)
        ax.set_xscale("log")
        ax.set_xlabel("I2F predicted error / |input|")
        ax.set_ylabel("attack's measured pixel RMSE")
        ax.set_title("prediction vs this run's attack")
    fig.tight_layout()
    return figure_uri(fig)


def run_context(out: Path) -> dict[str, Any]:
    """Everything the run page shows, read from the run's directory."""
    out = Path(out)
    try:
        config = yaml.safe_load((out / "config.yaml").read_text()) if (out / "config.yaml").exists() else {}
    except yaml.YAMLError:
        config = None
    if not isinstance(config, dict):  # an empty, hand-edited or broken file: show the rest of the run anyway
        config = {}
    results, metrics = read_csv(out / "results.csv"), read_csv(out / "metrics.csv")
    timings = json.loads((out / "timings.json").read_text()) if (out / "timings.json").exists() else {}
    gallery = []
    for _, row in results.iterrows():
        picture = out / "reconstructions" / f"round{int(row['round'])}_client{int(row['client'])}.png"
        gallery.append({"round": int(row["round"]), "client": int(row["client"]), "status": row.get("status"),
                        "error": row.get("error") if isinstance(row.get("error"), str) else "",
                        "image": png_uri(picture) if picture.exists() else None,
                        "metrics": {label: fmt(row.get(col), spec) for col, label, spec in METRIC_COLUMNS},
                        "identified": row.get("ident_pixel")})
    gallery.sort(key=lambda g: (g["round"], g["client"]))
    numbers = shared_numbers(out)
    epsilon = {c: metrics[c].iloc[-1] for c in ("epsilon", "epsilon_client") if c in metrics and len(metrics)}
    audit = audit_context(read_csv(out / "audit.csv"), results)
    if audit is not None and results.empty:
        title = f"fedsim audit: predicted leakage under {config.get('defense', 'none')}"
    else:
        title = f"fedsim run: {config.get('attack', '?')} against {config.get('defense', 'none')}"
    return {"title": title, "audit": audit, "not_reconstructed": NOT_RECONSTRUCTED,
            "config": config, "summary": summary_rows(results) if len(results) else [],
            "gallery": gallery, "failures": [g for g in gallery if g["status"] in NOT_RECONSTRUCTED],
            "budget": budget_line(results) if len(results) else None,
            "numbers": numbers[0] if numbers else None, "tensors": numbers[1] if numbers else {},
            "epsilon": epsilon, "delta": metrics["delta"].iloc[-1] if "delta" in metrics and len(metrics) else None,
            "accuracy": list(zip(metrics["round"], metrics["accuracy"])) if "accuracy" in metrics else [],
            "accuracy_plot": accuracy_plot(metrics), "timings": timings,
            "metric_labels": [label for _, label, _ in METRIC_COLUMNS]}


def write_run_page(out: Path) -> Path:
    """Write OUT/report.html for a run directory; returns its path."""
    page = environment().get_template("run.html.j2").render(**run_context(out))
    path = Path(out) / PAGE
    path.write_text(page, encoding="utf-8")
    return path


# -------------------------------------------------------------------------------------- a sweep


def sweep_context(out: Path) -> dict[str, Any]:
    """Everything the sweep page shows, read from the sweep's results table and trial folders."""
    out = Path(out)
    table = out / "results.parquet"
    df = pd.read_parquet(table) if table.exists() else read_csv(out / "results.csv")
    trials = df.drop_duplicates("trial_id") if len(df) else df
    ok = df[df.get("status", pd.Series("ok", index=df.index)) == "ok"] if len(df) else df
    per_trial = ok.groupby("trial_id").agg(psnr=("psnr", "median"), label_acc=("label_acc", "median")) \
        if len(ok) and "psnr" in ok else pd.DataFrame()
    rows = []
    for _, trial in trials.iterrows():
        tid = trial["trial_id"]
        link = out / "trials" / tid / PAGE
        options = ", ".join(f"{key}={trial[key]:g}" if isinstance(trial[key], float) else f"{key}={trial[key]}"
                            for key in declared() if key in trial and pd.notna(trial[key]))
        rows.append({"id": tid, "attack": trial.get("attack"), "defense": trial.get("defense"), "options": options,
                     "peft": trial.get("peft"), "status": trial.get("trial_status"),
                     "psnr": fmt(per_trial["psnr"].get(tid) if tid in per_trial.index else None, "{:.1f}"),
                     "accuracy": fmt(trial.get("accuracy_final"), "{:.1%}"),
                     "epsilon": fmt(epsilon_of(trial), "{:.3g}"),
                     "link": f"trials/{tid}/{PAGE}" if link.exists() else None})
    return {"title": f"fedsim sweep: {out.name}", "trials": rows, "scatter": tradeoff_plot(trials, per_trial),
            "heatmaps": heatmaps(ok), "cells": extremes(ok, out)}


def epsilon_of(trial) -> float:
    """A trial's epsilon, example-level or else client-level (NaN without a DP defense)."""
    values = [trial.get(c) for c in ("epsilon", "epsilon_client")]
    return next((float(v) for v in values if v is not None and pd.notna(v)), float("nan"))


def tradeoff_plot(trials: pd.DataFrame, per_trial: pd.DataFrame) -> str | None:
    """Leakage (median PSNR) against utility (final global accuracy), a point per trial."""
    if per_trial.empty or "accuracy_final" not in trials:
        return None
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for _, trial in trials.iterrows():
        if trial["trial_id"] not in per_trial.index:
            continue
        x, y = 100 * trial["accuracy_final"], per_trial.loc[trial["trial_id"], "psnr"]
        ax.scatter(x, y, color="#1f6feb")
        eps = epsilon_of(trial)
        label = f"{trial.get('attack')}/{trial.get('defense')}" + ("" if pd.isna(eps) else f" ε={eps:.2g}")
        ax.annotate(label, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("global accuracy after training (%)  → more useful")
    ax.set_ylabel("median PSNR of reconstructions (dB)  → more leakage")
    ax.grid(alpha=0.3)
    return figure_uri(fig)


def heatmaps(ok: pd.DataFrame) -> list[dict[str, str]]:
    """Median PSNR and label accuracy by attack x defense."""
    if ok.empty or "attack" not in ok or "defense" not in ok:
        return []
    plt = pyplot()
    maps = []
    for value, label in (("psnr", "median PSNR (dB)"), ("label_acc", "median label accuracy")):
        if value not in ok or ok[value].isna().all():
            continue
        grid = ok.pivot_table(index="attack", columns="defense", values=value, aggfunc="median")
        fig, ax = plt.subplots(figsize=(1.6 + 1.1 * grid.shape[1], 1.2 + 0.6 * grid.shape[0]))
        image = ax.imshow(grid.values, cmap="magma", aspect="auto")
        ax.set_xticks(range(grid.shape[1]), grid.columns, rotation=30, ha="right")
        ax.set_yticks(range(grid.shape[0]), grid.index)
        for i in range(grid.shape[0]):
            for j in range(grid.shape[1]):
                v = grid.values[i, j]
                if not pd.isna(v):
                    ax.text(j, i, f"{v:.2g}", ha="center", va="center", color="white" if v < grid.values[
                        ~pd.isna(grid.values)].mean() else "black", fontsize=8)
        fig.colorbar(image, ax=ax, label=label)
        maps.append({"label": label, "image": figure_uri(fig)})
    return maps


def extremes(ok: pd.DataFrame, out: Path) -> list[dict[str, Any]]:
    """The best and the worst reconstruction (by PSNR) of each attack x defense cell."""
    if ok.empty or "psnr" not in ok:
        return []
    cells = []
    for (attack, defense), group in ok.dropna(subset=["psnr"]).groupby(["attack", "defense"]):
        pictures = []
        for which, row in (("best", group.loc[group["psnr"].idxmax()]), ("worst", group.loc[group["psnr"].idxmin()])):
            path = out / "trials" / row["trial_id"] / "reconstructions" / \
                f"round{int(row['round'])}_client{int(row['client'])}.png"
            pictures.append({"which": which, "psnr": fmt(row["psnr"], "{:.1f}"),
                             "image": png_uri(path) if path.exists() else None})
        cells.append({"attack": attack, "defense": defense, "pictures": pictures})
    return cells


def write_sweep_page(out: Path) -> Path:
    page = environment().get_template("sweep.html.j2").render(**sweep_context(out))
    path = Path(out) / PAGE
    path.write_text(page, encoding="utf-8")
    return path


def write_page(directory: Path) -> Path:
    """`fedsim report DIR`: the page of a run (results.csv) or a sweep (results.parquet)."""
    directory = Path(directory)
    if (directory / "results.parquet").exists() or (directory / "trials").is_dir():
        for trial in sorted((directory / "trials").glob("*/results.csv")):
            write_run_page(trial.parent)
        return write_sweep_page(directory)
    if any((directory / name).exists() for name in ("results.csv", "config.yaml", "audit.csv")):
        return write_run_page(directory)
    raise FileNotFoundError(f"{directory} is neither a run or audit directory (results.csv, config.yaml, "
                            "audit.csv) nor a sweep "
                            "directory (results.parquet, trials/)")
