"""`fedsim sweep GRID.yaml`: many runs as Ray tasks, one results table, resumable. The grid file
(which runs, their ids) is `fedsim.grid`.

Design choices (and their cost):
- One Ray task per trial, not Ray Tune: a trial is one function call that returns rows; Ray tasks
  give the CPU/GPU request, scheduling over the cluster and failure isolation, and nothing in a
  sweep needs Tune's searchers, schedulers or its own experiment folders. Resume is ours: the
  table is keyed by a hash of each trial's resolved config, so re-running the command skips
  what finished (trials that failed run again).
- Inside a trial, the simulation runs on the in-process engine (`--engine inprocess`), never a
  second Ray instance inside the sweep's. Cost: a trial's clients train one after another in
  its worker, so one trial uses `--cpus-per-trial` cores; the parallelism is across trials,
  which is where a grid has plenty.
- The driver alone writes the table (Parquet, with a CSV copy): each finished trial is appended
  to OUT/results.journal (flushed and fsynced), and the table is rewritten from it at most every
  10 s and at the end, through a temporary file and os.replace, so a crash leaves the previous
  complete table and the journal the rest, never a half-written one.
- Each trial's own outputs (pictures, observations) go to OUT/trials/<id>/ on the machine that
  ran it: on a cluster, mount OUT at the same path on every node (docker/compose.yaml does) to
  see them all in one place.
"""

from __future__ import annotations

import collections
import json
import os
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedsim.config import ConfigError, RunConfig, check_writable_dir
from fedsim.grid import SWEEP_OWNED, Grid, Trial, identity
from fedsim.interrupts import RunStopped, StopSignal

TRIAL_COLUMNS = ["trial_id", "trial_status", "trial_error", "trial_seconds", "trial_finished"]


# ---------------------------------------------------------------- one trial (runs in a Ray worker)


def run_trial(config: dict, out: str, cpus: float) -> dict:
    """One `fedsim run` on the in-process engine; returns its result rows and its own wall time."""
    import torch

    from fedsim.runner import run

    torch.set_num_threads(max(1, int(cpus)))
    cfg = RunConfig(**{**config, "out": out, "overwrite": True, "engine": "inprocess"})
    if cfg.device == "auto":  # Ray assigns GPUs to trials that asked; the others must not touch one
        import ray

        cfg.device = "cuda" if ray.is_initialized() and ray.get_gpu_ids() else "cpu"
    start, started = time.perf_counter(), time.time()
    Path(out).mkdir(parents=True, exist_ok=True)
    with open(Path(out) / "log.txt", "w") as log:
        result = run(cfg, console=Console(file=log, width=120, force_terminal=False))
    seconds = time.perf_counter() - start
    rows = result.results.to_dict("records")
    accuracy = float(result.metrics["accuracy"].iloc[-1]) if len(result.metrics) else float("nan")
    return {"rows": rows, "seconds": seconds, "accuracy_final": accuracy, "span": (started, time.time())}


# ---------------------------------------------------------------- the table


class ResultsTable:
    """OUT/results.parquet (and a CSV copy): one row per attacked client update, or one per trial
    when nothing was attacked; every row carries the trial's id, status and full config.

    A finished trial reaches the table at once, through OUT/results.journal (one JSON line per
    trial, flushed and synced as it is written); the Parquet and CSV files are rewritten from it
    at most every WRITE_EVERY_S seconds and when the sweep ends, so a sweep of thousands of
    trials does not rewrite the whole table after each one. Loading reads both, so a sweep
    killed at any moment loses no finished trial."""

    WRITE_EVERY_S = 10.0

    def __init__(self, out: Path):
        self.parquet, self.csv, self.journal = out / "results.parquet", out / "results.csv", out / "results.journal"
        self.df = pd.read_parquet(self.parquet) if self.parquet.exists() else pd.DataFrame(columns=TRIAL_COLUMNS)
        self._written = time.monotonic()
        entries = self._journal_entries()
        for entry in entries:
            self._merge(entry["trial_id"], pd.DataFrame(entry["rows"]))
        if entries:
            self.write()

    def _journal_entries(self) -> list[dict]:
        if not self.journal.exists():
            return []
        entries = []
        for line in self.journal.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                entries.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut short by a killed sweep: its trial runs again
        return entries

    def finished(self) -> set[str]:
        return set(self.df.loc[self.df["trial_status"] == "ok", "trial_id"])

    def add(self, trial: Trial, rows: list[dict], status: str, error: str | None, seconds: float,
            accuracy: float = float("nan")) -> None:
        config = identity(trial.config)
        stamp = pd.Timestamp.now(tz="UTC").isoformat()
        new = [{**config, **row, "trial_id": trial.id, "trial_status": status, "trial_error": error,
                "trial_seconds": seconds, "trial_finished": stamp, "accuracy_final": accuracy}
               for row in rows or [{}]]
        with self.journal.open("a", encoding="utf-8") as f:
            f.write(json.dumps({"trial_id": trial.id, "rows": new}, default=_plain) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self._merge(trial.id, pd.DataFrame(new))
        if time.monotonic() - self._written > self.WRITE_EVERY_S:
            self.write()

    def _merge(self, trial_id: str, new: pd.DataFrame) -> None:
        new["trial_finished"] = pd.to_datetime(new["trial_finished"], utc=True)
        kept = self.df[self.df["trial_id"] != trial_id]  # a failed trial's earlier rows are replaced
        self.df = new if kept.empty else pd.concat([kept, new], ignore_index=True)

    def write(self) -> None:
        """Rewrite the Parquet and CSV files from everything known, then empty the journal."""
        front = [c for c in TRIAL_COLUMNS if c in self.df]
        self.df = self.df[front + [c for c in self.df.columns if c not in front]]
        for path, write in ((self.parquet, lambda p: self.df.to_parquet(p, index=False)),
                            (self.csv, lambda p: self.df.to_csv(p, index=False))):
            tmp = path.with_name(path.name + ".tmp")
            write(tmp)
            os.replace(tmp, path)  # atomic: readers see the old table or the new one, never half
        self.journal.unlink(missing_ok=True)  # all of it is in the table now
        self._written = time.monotonic()


def _plain(value):
    """JSON for numpy scalars and the like."""
    return value.item() if hasattr(value, "item") else str(value)


# ---------------------------------------------------------------- the sweep


@dataclass
class SweepSummary:
    ran: list[str]  # trial ids run this time
    skipped: list[str]  # finished in an earlier sweep
    failed: list[str]
    ray_start_s: float
    wall_s: float  # first submission to the last row written
    table: pd.DataFrame
    spans: dict[str, tuple[float, float]]  # trial id -> (start, end) of its run, epoch seconds (ok trials)


def sweep(grid: Grid, out: Path, address: str | None = None, gpus_per_trial: float | None = None,
          cpus_per_trial: float = 1.0, max_concurrent: int | None = None,
          console: Console | None = None) -> SweepSummary:
    """Run the grid's unfinished trials on Ray, appending each one's rows to OUT/results.parquet."""
    import ray

    console = console or Console()
    if cpus_per_trial <= 0:
        raise ConfigError(f"--cpus-per-trial must be > 0, got {cpus_per_trial}")
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError(f"--max-concurrent must be >= 1, got {max_concurrent}")
    out = Path(out).resolve()
    check_writable_dir(out)
    out.mkdir(parents=True, exist_ok=True)
    table = ResultsTable(out)
    done = table.finished()
    todo = [t for t in grid.trials if t.id not in done]
    skipped = [t.id for t in grid.trials if t.id in done]
    console.print(f"{len(grid.trials)} trials: {len(skipped)} finished earlier, {len(todo)} to run; table "
                  f"{table.parquet}")
    if not todo:
        report(grid, table.df, out, console)
        return SweepSummary([], skipped, [], 0.0, 0.0, table.df, {})

    if any(t.config.model == "tiny-clip" and t.config.pretrained == "fedsim" for t in todo):
        from fedsim.models.pretrain import ensure_pretrained

        # Build the cached checkpoint once here rather than in every first trial at the same time
        # (the trials share this machine's cache; cluster nodes get it baked into docker's image).
        ensure_pretrained(console=console)
    start = time.perf_counter()
    started_ray = not ray.is_initialized()
    stop = StopSignal()
    with stop.installed():
        try:
            if started_ray:
                warnings.filterwarnings("ignore", message=".*Ray will no longer override accelerator")  # a tip
                env = {"env_vars": {"FLWR_TELEMETRY_ENABLED": "0"}}
                kwargs = {"address": address} if address else {"include_dashboard": False}
                ray.init(**kwargs, runtime_env=env, log_to_driver=False, configure_logging=False)
                stop.reinstall()  # ray.init takes SIGTERM for itself
            ray_start = time.perf_counter() - start
            resources = ray.cluster_resources()
            gpus = _gpu_request(gpus_per_trial, resources.get("GPU", 0.0))
            window = max_concurrent or submission_window(resources, cpus_per_trial, gpus)
            console.print(f"Ray: {resources.get('CPU', 0):g} CPUs, {resources.get('GPU', 0):g} GPUs; each trial "
                          f"asks for {cpus_per_trial:g} CPU and {gpus:g} GPU; at most {window} submitted at once")
            remote = ray.remote(run_trial).options(num_cpus=cpus_per_trial, num_gpus=gpus, max_retries=1,
                                                   retry_exceptions=False)
            t0 = time.perf_counter()
            ran, failed, spans = _run_trials(remote, todo, table, out, cpus_per_trial, window, console, stop)
            wall = time.perf_counter() - t0
        except KeyboardInterrupt:
            stop.request()
            done = len(table.finished() & {t.id for t in grid.trials})
            raise RunStopped(f"stopped on {stop.name}: {done} of {len(grid.trials)} trials are in "
                             f"{table.parquet}. Run the same command again to continue", stop.exit_code) from None
        finally:
            table.write()
            if started_ray:
                ray.shutdown()
    report(grid, table.df, out, console)
    return SweepSummary(ran, skipped, failed, ray_start, wall, table.df, spans)


def submission_window(resources: dict, cpus_per_trial: float, gpus_per_trial: float) -> int:
    """How many trials are submitted to Ray at once when --max-concurrent is not given: twice
    what the cluster can run together, so a worker never waits for the driver, while a grid of
    thousands is not handed to Ray (and held in memory) all at once."""
    fits = resources.get("CPU", 1.0) / cpus_per_trial
    if gpus_per_trial:
        fits = min(fits, resources.get("GPU", 0.0) / gpus_per_trial)
    return max(1, 2 * int(fits))


def _run_trials(remote, todo: list[Trial], table: ResultsTable, out: Path, cpus: float,
                window: int, console: Console, stop: StopSignal):
    """Submit trials (at most `window` in flight) and record each one as it finishes."""
    import ray

    ran, failed, pending, spans = [], [], {}, {}
    queue = collections.deque(todo)
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    try:
        with Progress(*columns, console=console) as progress:
            bar = progress.add_task("trials", total=len(todo))
            while queue or pending:
                while queue and len(pending) < window:
                    trial = queue.popleft()
                    # all the trial's settings, its time limits included: only what the sweep sets is left out
                    config = {k: v for k, v in trial.config.to_dict().items() if k not in SWEEP_OWNED}
                    ref = remote.remote(config, str(out / "trials" / trial.id), cpus)
                    pending[ref] = (trial, time.perf_counter())
                [ref], _ = ray.wait(list(pending), num_returns=1)
                trial, submitted = pending.pop(ref)
                try:
                    result = ray.get(ref)
                    with stop.critical():  # Ctrl-C waits for the trial's line in the journal
                        table.add(trial, result["rows"], "ok", None, result["seconds"], result["accuracy_final"])
                    spans[trial.id] = result["span"]
                except Exception as exc:  # a failed trial is a row in the table; the sweep goes on
                    error = _error_text(exc)
                    with (out / "errors.log").open("a") as log:
                        log.write(f"trial {trial.id}\n{traceback.format_exc()}\n")
                    with stop.critical():
                        table.add(trial, [], "failed", error, time.perf_counter() - submitted)
                    failed.append(trial.id)
                    progress.console.print(f"[red]trial {trial.id} failed:[/] {error}")
                ran.append(trial.id)
                progress.advance(bar)
    finally:
        for ref in pending:  # interrupted: stop what is still running; the table keeps what finished
            ray.cancel(ref, force=True)
    return ran, failed, spans


def _gpu_request(asked: float | None, available: float) -> float:
    """GPUs only where the cluster has them: a GPU request on a CPU-only cluster would wait forever."""
    if asked is None:
        return 1.0 if available else 0.0
    if asked < 0:
        raise ConfigError(f"--gpus-per-trial must be >= 0, got {asked}")
    if asked > 0 and not available:
        raise ConfigError(f"--gpus-per-trial {asked:g} but the Ray cluster has no GPUs; valid here: 0")
    return asked


def _error_text(exc: Exception) -> str:
    cause = getattr(exc, "cause", None) or exc  # RayTaskError wraps the trial's own exception
    return f"{type(cause).__name__}: {cause}".strip()


# ---------------------------------------------------------------- the report


def pivots(df: pd.DataFrame, spec: dict[str, list[str]]) -> dict[str, pd.DataFrame]:
    """Median of each value over the rest (seeds, clients, rounds) by rows x columns; ok rows only."""
    ok = df[df["trial_status"] == "ok"]
    if "status" in ok:
        ok = ok[ok["status"].isna() | (ok["status"] == "ok")]
    # A trial whose plugins do not read an axis option has no value there (dp_noise under no
    # defense): it gets a row of its own, "-", rather than being dropped from the pivot.
    axes = [a for a in spec["rows"] + spec["columns"] if a in ok]
    ok = ok.astype({a: object for a in axes}).fillna({a: "-" for a in axes})
    tables = {}
    for value in spec["values"]:
        if value not in ok or ok[value].isna().all():
            continue
        tables[value] = ok.pivot_table(index=spec["rows"], columns=spec["columns"] or None, values=value,
                                       aggfunc="median")
    return tables


def report(grid: Grid, df: pd.DataFrame, out: Path, console: Console) -> dict[str, pd.DataFrame]:
    """Print and save pivot tables (pivot_<value>.csv) and a bar chart of each (pivot_<value>.png)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ids = {t.id for t in grid.trials}
    df = df[df["trial_id"].isin(ids)]  # this grid's trials only
    statuses = df.drop_duplicates("trial_id")["trial_status"].value_counts()
    console.print(f"trials: {statuses.get('ok', 0)} ok, {statuses.get('failed', 0)} failed of {len(ids)}; "
                  f"table {out / 'results.parquet'}")
    if "status" in df:  # attacks that failed inside a finished trial are left out of the pivots: say so
        bad = df[df["status"] == "failed"]
        for error, rows in bad.groupby("error", dropna=False):
            console.print(f"[yellow]{len(rows)} attacked updates failed[/] ({', '.join(rows['attack'].unique())}): "
                          f"{error}")
    tables = pivots(df, grid.report)
    for value, table in tables.items():
        table.to_csv(out / f"pivot_{value}.csv")
        console.print(f"\n[bold]median {value}[/] by {' x '.join(grid.report['rows'] + grid.report['columns'])}")
        console.print(table.round(3).to_string())
        ax = table.plot.bar(figsize=(max(4, 1 + 0.8 * len(table)), 3.5), rot=0, legend=bool(grid.report["columns"]))
        ax.set_ylabel(f"median {value}")
        ax.figure.tight_layout()
        ax.figure.savefig(out / f"pivot_{value}.png", dpi=100)
        plt.close(ax.figure)
    from fedsim.pages import write_sweep_page

    console.print(f"report: open [bold]{write_sweep_page(out)}[/] in a browser")
    return tables
