"""`fedsim run`: the one flow from a RunConfig to a results table and pictures.

config -> Setting (data, public model, defense, the server's knowledge) -> Flower simulation
(clients behind a defense, curious server) -> per reply: Observation -> attack built from the
knowledge -> Reconstruction -> scored against the true batch, which the scorer re-derives from
the seeded schedule (it never travels with the update) -> RunResult.
"""

from __future__ import annotations

import errno
import json
import os
import re
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedsim.accounting import Accounting
from fedsim.config import ConfigError, RunConfig
from fedsim.evaluate import lpips_metric
from fedsim.flower import make_client_app, make_server_app, quiet_flower, serve
from fedsim.harness import Scorer, Setting, Truth
from fedsim.interrupts import RunInterrupted, RunStopped, StopSignal
from fedsim.memory import check_memory
from fedsim.models import resolve_device
from fedsim.observation import Observation, non_finite
from fedsim.outdir import output_lock, prepare_output, replace_dir, resumed_config
from fedsim.pages import PAGE, write_run_page
from fedsim.report import ResultsWriter, paste_side_by_side, save_grid
from fedsim.training import accuracy

COMBINED_CLIENTS = 32  # clients of the last round in reconstructions.png
CLIENT_GPU_SHARE = 0.25  # each client actor takes a quarter GPU: four train at once per GPU


@dataclass
class Timings:
    """Where a run's wall time went. Flower starts Ray while the server sends round 1, so the
    wait for replies holds Ray's start-up as well as the clients' training."""

    started: float = field(default_factory=time.perf_counter)
    waiting_for_clients: float = 0.0  # wall time between sending a round and its replies
    client_compute: float = 0.0  # summed over clients, as they report it
    attacks: float = 0.0

    def as_dict(self) -> dict[str, float]:
        return {"total_s": round(time.perf_counter() - self.started, 2),
                "waiting_for_clients_s": round(self.waiting_for_clients, 2),
                "client_compute_s": round(self.client_compute, 2), "attacks_s": round(self.attacks, 2)}


class RunProgress:
    """The run's progress bars: client updates received (and attacked), with what the run is
    doing now, and the attack's iterations on the current update."""

    def __init__(self, progress: Progress, total_updates: int, attacking: bool):
        self.progress = progress
        self.counted = "updates attacked" if attacking else "updates received"
        self.bar = progress.add_task(self.counted, total=total_updates)
        self.iter_bar = progress.add_task("attack iterations", total=1, visible=False)

    def say(self, doing: str) -> None:
        """What the run is doing now, next to what the bar counts."""
        self.progress.update(self.bar, description=f"{self.counted} ({doing})")

    def finish(self) -> None:
        self.progress.update(self.bar, description=f"{self.counted}: done")

    def attack_iterations(self, done: int, total: int) -> None:
        self.progress.update(self.iter_bar, completed=done, total=total, visible=True)

    def attack_done(self) -> None:
        self.progress.update(self.iter_bar, visible=False)

    def updates_done(self, n: int) -> None:
        self.progress.advance(self.bar, n)


class Recorder:
    """What a run writes into --out: observations, reconstruction grids, results.csv (row by
    row), metrics.csv (per round) and errors.log."""

    def __init__(self, out: Path, class_names, resume: bool = False, stop: StopSignal | None = None):
        self.out, self.class_names, self.stop = out, class_names, stop or StopSignal()
        for sub in ("reconstructions", "observations"):
            (out / sub).mkdir(exist_ok=True)
        try:
            self.results = ResultsWriter(out / "results.csv", resume)
        except ValueError as exc:
            raise ConfigError(f"cannot resume: {exc}") from None
        self.metrics_path = out / "metrics.csv"
        self.metrics_path.unlink(missing_ok=True)  # appended per round; a resumed run evaluates every round again

    @staticmethod
    def tag(obs: Observation) -> str:
        return f"round{obs.round}_client{obs.client}"

    def observation(self, obs: Observation) -> None:
        obs.save(self.out / "observations" / f"{self.tag(obs)}.pt")

    def reconstruction(self, obs: Observation, recon, order, truth: Truth) -> None:
        rows = [(truth.images, truth.labels), (recon.images[order], recon.labels[order])]
        save_grid(self.out / "reconstructions" / f"{self.tag(obs)}.png", rows, self.class_names)

    def combined(self) -> None:
        """reconstructions.png: every client of the last round (up to COMBINED_CLIENTS), true
        images above their reconstructions, in one picture to paste. Built from the saved
        per-client pictures, so a resumed run's picture holds the clients of both parts."""
        found = [(int(m[1]), int(m[2]), path) for path in (self.out / "reconstructions").glob("round*_client*.png")
                 if (m := re.fullmatch(r"round(\d+)_client(\d+)\.png", path.name))]
        if not found:
            return
        last = max(r for r, _, _ in found)
        paths = [path for _, _, path in sorted(f for f in found if f[0] == last)][:COMBINED_CLIENTS]
        paste_side_by_side(self.out / "reconstructions.png", paths)

    def failure(self, obs: Observation) -> None:
        with (self.out / "errors.log").open("a") as log:
            log.write(f"{self.tag(obs)}\n{traceback.format_exc()}\n")

    def row(self, row: dict) -> None:
        with self.stop.critical():  # Ctrl-C waits for the row: results.csv never holds half of one
            self.results.write(row)

    def metrics(self, row: dict) -> None:
        pd.DataFrame([row]).to_csv(self.metrics_path, mode="a", header=not self.metrics_path.exists(), index=False)


class AttackTimeout(Exception):
    """An attack ran past --attack-timeout (raised from its progress callback)."""


class CuriousServer:
    """What the curious server does with what it sees (the strategy's listener): save each
    Observation, attack it, score the Reconstruction against the re-derived truth, and evaluate
    the global model each round. Each concern is its own object; this one only sequences them."""

    def __init__(self, setting: Setting, attack, recorder: Recorder, progress: RunProgress,
                 stop: StopSignal | None = None):
        self.setting, self.cfg, self.attack = setting, setting.cfg, attack
        self.recorder, self.progress = recorder, progress
        self.stop = stop or StopSignal()
        self.idle = threading.Event()  # not inside __call__: what an interrupt waits for
        self.idle.set()
        self.scorer = setting.scorer()
        if attack is not None:
            attack.progress = self._iteration
        self._deadline: float | None = None  # of the attack running now, under --attack-timeout
        self.client_sizes = [len(idx) for idx in setting.data.client_indices]
        self.timings = Timings()
        self._round_sent = 0.0

    def evaluate_global(self, server_round: int, arrays):
        """The server's evaluation of the global model on the held-out half of its public split
        (the half the tiny CLIP was not pre-trained on) -> metrics.csv."""
        from flwr.app import MetricRecord

        self.progress.say(f"round {server_round}: evaluating the global model")
        task = self.setting.task
        params = {n: p.to(task.device) for n, p in arrays.to_torch_state_dict().items()}
        held_out = self.setting.data.public_eval
        metrics = accuracy(task, params, held_out.images, held_out.labels)
        self.recorder.metrics({"round": server_round, **metrics, **self.privacy(server_round)})
        self.progress.say(f"round {server_round}: global model evaluated")
        return MetricRecord(metrics)

    def privacy(self, rounds: int) -> dict[str, float]:
        """The privacy the defense chain has bought after `rounds` rounds (epsilon at its delta)."""
        return self.setting.defense.privacy(Accounting.of(self.setting.protocol, self.client_sizes, rounds))

    def round_sent(self, server_round: int) -> None:
        self._round_sent = time.perf_counter()
        self.progress.say(f"round {server_round}: clients training")

    def replies_received(self, server_round: int, client_seconds: float) -> None:
        self.timings.waiting_for_clients += time.perf_counter() - self._round_sent
        self.timings.client_compute += client_seconds

    def __call__(self, obs: Observation) -> None:
        self.idle.clear()
        try:
            self.stop.check()
            if self.attack is not None and (obs.round, obs.client) not in self.recorder.results.finished:
                self.recorder.observation(obs)
                self.progress.say(f"round {obs.round}: attacking client {obs.client}")
                row = {"round": obs.round, "client": obs.client, "attack": self.cfg.attack,
                       "defense": self.cfg.defense, "peft": self.cfg.peft, "model": self.cfg.model,
                       "dataset": self.cfg.dataset, "batch_size": obs.batch_size, **self.privacy(obs.round)}
                row.update(self._attack(obs))
                self.recorder.row(row)
            elif self.attack is None:
                self.recorder.observation(obs)
            self.progress.updates_done(len(obs.clients) or 1)  # an aggregate stands for its clients
        finally:
            self.idle.set()

    def _iteration(self, done: int, total: int) -> None:
        """The attack reports an iteration: the progress bar, and the budget's check."""
        self.progress.attack_iterations(done, total)
        self.stop.check()
        if self._deadline is not None and time.perf_counter() > self._deadline:
            raise AttackTimeout(f"stopped after {self.cfg.attack_timeout:g} s (--attack-timeout), at iteration "
                                f"{done} of {total}")

    def _attack(self, obs: Observation) -> dict:
        start = time.perf_counter()
        self._deadline = start + self.cfg.attack_timeout if self.cfg.attack_timeout > 0 else None
        broken = non_finite(obs.update)
        if broken:  # nothing to invert, and an attack on it could run forever: say so and go on
            self.progress.attack_done()
            return {"status": "invalid", "seconds": 0.0,
                    "error": f"the update holds NaN or infinite values ({', '.join(broken[:3])})"}
        try:
            with single_cpu_thread(self.setting.task.device):
                recon = self.attack.reconstruct(obs, self.setting.task)
            if not bool(torch.isfinite(recon.images).all()):
                raise FloatingPointError("the attack returned NaN or infinite pixels")
            truth = self.setting.truth(obs.round, obs.clients or (obs.client,))
            metrics, order = self.scorer.score(obs, recon, truth)
            self.recorder.reconstruction(obs, recon, order, truth)
            result = Scorer.result(metrics, recon)
        except AttackTimeout as exc:
            result = {"status": "timeout", "error": str(exc)}
        except RunInterrupted:
            raise  # not the attack's failure: the run is stopping
        except Exception as exc:  # one failed attack must not lose the run: record it and go on
            self.recorder.failure(obs)
            result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        finally:
            self.progress.attack_done()
        seconds = time.perf_counter() - start
        self.timings.attacks += seconds
        return {**result, "seconds": round(seconds, 3)}


@contextmanager
def single_cpu_thread(device):
    """Flower calls the strategy from a worker thread, where PyTorch's CPU thread pool does
    badly: DLG on the tiny CLIP took 10.2 s with 2 threads there against 4.7 s with one (5.5 s
    on the main thread either way; benchmarks/thread_pool.py). So attacks on CPU get one thread."""
    if torch.device(device).type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# a full disk, an exhausted quota, a file system gone read-only: the run stops, its rows kept
WRITE_FAILURES = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


@dataclass
class RunResult:
    """What a run produced: its tables, where its time went, and where its files are."""

    config: RunConfig
    out: Path
    results: pd.DataFrame  # results.csv: a row per attacked update
    metrics: pd.DataFrame  # metrics.csv: global accuracy (and epsilon) per round
    timings: dict[str, float]
    report: Path | None = None  # report.html


def run(cfg: RunConfig, console: Console | None = None, verbose: bool = False, grid=None) -> RunResult:
    """Run one configuration end to end. With a Flower `grid` (inside a ServerApp started by
    `flwr run`, see fedsim.app) the rounds go to its nodes; otherwise `cfg.engine` simulates the
    clients. Prints only progress; `fedsim.report.print_result` prints the result. Ctrl-C or
    SIGTERM raises `RunStopped` once the finished rows are safe (see fedsim.interrupts)."""
    console = console or Console()
    if cfg.resume:
        cfg = resumed_config(cfg)
    cfg.validate()
    check_memory(cfg)  # a run this machine cannot hold is refused with the numbers, before any work
    setting = Setting(cfg)
    setting.data  # checks the batch size against every client's data, before any file is written
    attack = setting.attack()  # an attack that refuses its options fails here, before any work
    setting.task  # so does a model that cannot be built (a prompt longer than the text encoder's context)
    out, work = prepare_output(cfg)
    with output_lock(out):
        cfg.save(work / "config.yaml")
        result = _run(cfg, setting, attack, out, work, console, verbose, grid)
    return result


def _run(cfg: RunConfig, setting: Setting, attack, out: Path, work: Path, console: Console, verbose: bool,
         grid) -> RunResult:
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    quiet_flower(verbose)
    if not lpips_metric().available and cfg.attack != "none":
        console.print(f"[yellow]{lpips_metric().reason}[/]")

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    stop = StopSignal()
    recorder = Recorder(work, setting.knowledge.class_names, cfg.resume, stop)
    with stop.installed(), Progress(*columns, console=console, transient=False) as progress:
        server = CuriousServer(setting, attack, recorder,
                               RunProgress(progress, cfg.rounds * setting.protocol.sampled_clients, attack is not None),
                               stop)
        initial = {n: p.cpu() for n, p in setting.task.trainable().items()}
        try:
            if grid is not None:
                serve(grid, cfg, initial, setting.spec, server, server.evaluate_global, stop)
            else:
                server_app = make_server_app(cfg, initial, setting.spec, server, server.evaluate_global, stop)
                simulate(cfg, server_app, make_client_app(cfg), stop)
        except (KeyboardInterrupt, RunInterrupted):
            stop.request()
            server.idle.wait(timeout=60)  # the server's own thread (Ray engine) ends its current step
            progress.stop()
            raise _stopped(stop, cfg, out, work, recorder, server) from None
        except OSError as exc:
            if exc.errno not in WRITE_FAILURES:
                raise
            rows = len(recorder.results.finished)
            raise ConfigError(f"cannot write into {work}: {exc.strerror} ({exc.filename or 'a run file'}). The "
                              f"{rows} rows finished before it are in {work / 'results.csv'}; make room, then "
                              f"continue with: fedsim run --resume --out {out}") from None
        server.progress.finish()
    recorder.combined()
    timings = server.timings.as_dict()
    (work / "timings.json").write_text(json.dumps(timings, indent=2))
    write_run_page(work)
    if work != out:  # --overwrite: the new run is complete, so it replaces the old one
        replace_dir(work, out)
    metrics = pd.read_csv(out / "metrics.csv") if (out / "metrics.csv").exists() else pd.DataFrame()
    return RunResult(cfg, out, pd.read_csv(out / "results.csv"), metrics, timings, out / PAGE)


def _stopped(stop: StopSignal, cfg: RunConfig, out: Path, work: Path, recorder: Recorder,
             server: CuriousServer) -> RunStopped:
    """Leave an interrupted run's directory readable (picture, timings, page) and say what was kept."""
    rows = len(recorder.results.finished)
    total = cfg.rounds * server.setting.protocol.sampled_clients if cfg.attack != "none" else 0
    kept = f"{rows} of {total} rows are in {work / 'results.csv'}" if total else f"its files are in {work}"
    old = f"; {out} still holds the previous run, untouched" if work != out else ""
    said = f"stopped on {stop.name}: {kept}{old}. Continue with: fedsim run --resume --out {out}"
    with stop.critical():
        recorder.combined()
        # the page says it too: a reader of report.html must not take the rows shown for the whole run
        (work / "timings.json").write_text(json.dumps({**server.timings.as_dict(), "interrupted": said}, indent=2))
        write_run_page(work)
    return RunStopped(said, stop.exit_code)


def simulate(cfg: RunConfig, server_app, client_app, stop: StopSignal | None = None) -> None:
    """Flower's simulation engine on its Ray backend, or everything in this process."""
    if cfg.engine == "inprocess":
        from fedsim.engine import run_inprocess

        run_inprocess(server_app, client_app, cfg.clients)
        return
    import ray
    from flwr.simulation import run_simulation

    # Ray is started here rather than by Flower so that the run owns it: ray.init takes SIGTERM
    # for itself (exiting without unwinding), and an interrupted run must end the Ray processes.
    started = not ray.is_initialized()
    if started:
        path = os.pathsep.join([*sys.path, *filter(None, [os.environ.get("PYTHONPATH")])])
        ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
                 runtime_env={"env_vars": {"PYTHONPATH": path, "FLWR_TELEMETRY_ENABLED": "0"}})
        if stop is not None:
            stop.reinstall()
    # Ask Ray for GPUs only when there are some: a GPU request without CUDA hangs the simulation.
    gpus = CLIENT_GPU_SHARE if resolve_device(cfg.device) == "cuda" else 0.0
    backend_config = {"client_resources": {"num_cpus": 1, "num_gpus": gpus}}
    try:
        run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.clients,
                       backend_name="ray", backend_config=backend_config)
    except BaseException:
        if stop is not None:
            stop.request()  # Flower's server thread checks it and ends at its next step
        raise
    finally:
        if started:
            ray.shutdown()
