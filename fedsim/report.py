"""What a run leaves behind: the results table, image grids and the closing summary."""

from __future__ import annotations

import csv
import io
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image, ImageDraw
from rich.table import Table

RESULT_COLUMNS = ["round", "client", "attack", "defense", "peft", "model", "dataset", "batch_size",
                  "epsilon", "epsilon_client", "label_acc", "mse", "psnr", "ssim", "lpips", "ident_pixel",
                  "ident_feature", "emb_cos", "emb_cos_centred", "prior", "gradient_loss", "update_numbers",
                  "unknowns", "seconds", "status", "error"]


class ResultsWriter:
    """Appends one row per (round, client, attack) to results.csv, flushed as it goes, so a
    run that fails or is interrupted midway keeps every row it finished. With `resume`, the
    rows already there are kept (a last row cut short by a killed process is dropped).
    `finished` names every (round, client) row in the file, kept or written since."""

    def __init__(self, path: Path, resume: bool = False):
        self.path = path
        kept = complete_rows(path) if resume and path.exists() else []
        tmp = path.with_name(path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, RESULT_COLUMNS)
            writer.writeheader()
            writer.writerows(kept)
        tmp.replace(path)
        self.finished = {(int(row["round"]), int(row["client"])) for row in kept}

    def write(self, row: dict) -> None:
        line = io.StringIO()
        csv.DictWriter(line, RESULT_COLUMNS, extrasaction="ignore").writerow(row)
        with self.path.open("a", newline="") as f:
            f.write(line.getvalue())  # one write per row: a row is there whole or not at all
        self.finished.add((int(row["round"]), int(row["client"])))


def complete_rows(path: Path) -> list[dict]:
    """results.csv's rows that are whole: every column present, round and client numbers."""
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.endswith("\n"):
        text = text[: text.rfind("\n") + 1]  # a last row without its line end was cut short
    reader = csv.DictReader(io.StringIO(text, newline=""))
    if reader.fieldnames != RESULT_COLUMNS:
        raise ValueError(f"{path} is not a fedsim results table (its columns are {reader.fieldnames})")
    return [row for row in reader
            if None not in row and None not in row.values()  # fewer or more fields than columns
            and row["round"].isdigit() and row["client"].isdigit() and row["status"]]


def save_grid(path: Path, rows: list[tuple[torch.Tensor, torch.Tensor]], class_names,
              scale: int = 3) -> None:
    """One row of images per (images [B, C, H, W], labels [B]) pair, each label's class name
    under its image. Runs save the true batch on top and the matched reconstruction below."""
    b, _, h, w = rows[0][0].shape
    cell_w, cell_h, text_h, pad = w * scale, h * scale, 14, 4
    canvas = Image.new("RGB", (b * (cell_w + pad) + pad, len(rows) * (cell_h + text_h + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (images, labels) in enumerate(rows):
        y = pad + r * (cell_h + text_h + pad)
        for i in range(b):
            x = pad + i * (cell_w + pad)
            pixels = (images[i].clamp(0, 1).permute(1, 2, 0).cpu().numpy() * 255).round().astype(np.uint8)
            canvas.paste(Image.fromarray(pixels).resize((cell_w, cell_h), Image.NEAREST), (x, y))
            label = int(labels[i])
            name = class_names[label] if 0 <= label < len(class_names) else "?"
            draw.text((x, y + cell_h + 1), name[: max(cell_w // 6, 3)], fill="black")
    canvas.save(path)


def save_grids_side_by_side(path: Path, grids: list[list[tuple[torch.Tensor, torch.Tensor]]], class_names,
                            scale: int = 3) -> None:
    """Several grids of the same rows (e.g. one client's true batch above its reconstruction),
    side by side in one picture: row r holds every grid's row r."""
    rows = [(torch.cat([g[r][0] for g in grids]), torch.cat([g[r][1] for g in grids])) for r in range(len(grids[0]))]
    save_grid(path, rows, class_names, scale)


def paste_side_by_side(path: Path, pictures: list[Path]) -> None:
    """Pictures of the same height (per-client grids) side by side in one."""
    images = [Image.open(p).convert("RGB") for p in pictures]
    canvas = Image.new("RGB", (sum(im.width for im in images), max(im.height for im in images)), "white")
    x = 0
    for im in images:
        canvas.paste(im, (x, 0))
        x += im.width
    canvas.save(path)


def summary_table(results: pd.DataFrame) -> Table:
    """One line per (attack, defense): successful attacks / all, then medians over clients and
    rounds of label accuracy, PSNR (dB), SSIM, LPIPS, the share identified by pixels, seconds."""
    table = Table(title="fedsim results (median over clients and rounds)")
    for col in ("attack", "defense", "ok", "label", "PSNR", "SSIM", "LPIPS", "ident", "sec"):
        table.add_column(col, justify="left" if col in ("attack", "defense") else "right")
    for (attack, defense), g in results.groupby(["attack", "defense"], sort=False):
        ok = g[g["status"] == "ok"]
        table.add_row(attack, defense, f"{len(ok)}/{len(g)}",
                      _fmt(ok["label_acc"].median(), "{:.0%}"), _fmt(ok["psnr"].median(), "{:.2f}"),
                      _fmt(ok["ssim"].median(), "{:.3f}"), _fmt(ok["lpips"].median(), "{:.3f}"),
                      _fmt(ok["ident_pixel"].mean(), "{:.0%}"),
                      _fmt(ok["seconds"].median(), "{:.1f}"))
    return table


def _fmt(value, spec: str) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else spec.format(value)


def budget_line(results) -> str | None:
    """The information budget of an attack that reports one (MIP): the numbers each update carries
    against the unknowns it must recover (batch x embedding width); fewer numbers than unknowns
    means the update cannot pin the embeddings down, whatever the attack."""
    if "unknowns" not in results or results["unknowns"].isna().all():
        return None
    row = results.dropna(subset=["unknowns"]).iloc[0]
    numbers, unknowns = int(row["update_numbers"]), int(row["unknowns"])
    verdict = "under-determined" if numbers < unknowns else "determined"
    return (f"information budget: each update carries {numbers:,} numbers for {unknowns:,} unknowns "
            f"(batch {int(row['batch_size'])} x embedding width): {numbers / unknowns:.2g} per unknown, {verdict}")


def print_result(console, result) -> None:
    """A run's closing summary on the terminal: the results table, global accuracy, privacy spent,
    where the time went, and where the files are (a fedsim.runner.RunResult)."""
    results, metrics, timings, cfg = result.results, result.metrics, result.timings, result.config
    if len(results):
        console.print(summary_table(results))
        budget = budget_line(results)
        if budget:
            console.print(budget)
    if len(metrics):
        console.print(f"global accuracy on the held-out public split: {metrics['accuracy'].iloc[0]:.1%} before "
                      f"round 1, {metrics['accuracy'].iloc[-1]:.1%} after round {int(metrics['round'].iloc[-1])}")
        for column, unit in (("epsilon", "example-level"), ("epsilon_client", "client-level")):
            if column in metrics:
                delta = metrics["delta"].iloc[-1] if "delta" in metrics else float("nan")
                console.print(f"privacy spent: {unit} epsilon {metrics[column].iloc[-1]:.3g} at delta {delta:g}")
    if not len(results) and cfg.attack != "none":
        console.print("[red]no client update was attacked: see the Flower log above[/]")
    console.print(f"time: {timings['total_s']:.1f}s; waiting for clients (engine start-up + training) "
                  f"{timings['waiting_for_clients_s']:.1f}s, of which client compute "
                  f"{timings['client_compute_s']:.1f}s summed over clients; attacks {timings['attacks_s']:.1f}s")
    console.print(f"results in [bold]{result.out}[/]" + (f"; open [bold]{result.report}[/] in a browser"
                                                         if result.report else ""))
