"""`fedsim run`: the one flow from a RunConfig to a results table and pictures.

config -> data + public model -> Flower simulation (clients behind a defense, curious server)
-> per reply: Observation -> attack -> Reconstruction -> evaluation against the true batch,
which the evaluator re-derives from the seeded schedule (it never travels with the update).
"""

from __future__ import annotations

import json
import os
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import pandas as pd
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from fedsim.config import RunConfig
from fedsim.data import FederatedData, federated_data
from fedsim.evaluate import embedding_similarity, evaluate, lpips_metric, mean_embedding
from fedsim.flower import clients_per_round, make_client_app, make_server_app, quiet_flower, serve
from fedsim.models import build_task, model_spec, resolve_device
from fedsim.observation import Observation
from fedsim.plugins import attack_names, defense_names, make_attack, make_defense
from fedsim.report import ResultsWriter, save_grid, summary_table
from fedsim.task import Task
from fedsim.training import accuracy, client_examples

GALLERY_SIZE = 256  # public images in the identifiability gallery
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


class AttackPipeline:
    """Runs the attack on each Observation, then scores it against the re-derived true batch."""

    def __init__(self, cfg: RunConfig, data: FederatedData, task: Task, attack, out: Path, progress: Progress):
        self.cfg, self.data, self.task, self.out = cfg, data, task, out
        self.progress = progress
        self.bar = progress.add_task("clients training", total=cfg.rounds * clients_per_round(cfg))
        self.iter_bar = progress.add_task("attack iterations", total=cfg.attack_iters, visible=False)
        self.attack = attack
        if attack is not None:
            attack.progress = self._attack_progress
        self.writer = ResultsWriter(out / "results.csv")
        self.gallery = data.public.images[:GALLERY_SIZE]  # public images a reconstruction must stand out from
        self._centre: tuple[int, torch.Tensor] | None = None  # (round, gallery's mean embedding)
        self.defense = make_defense(cfg)
        (out / "metrics.csv").unlink(missing_ok=True)  # rows are appended per round: start afresh on --overwrite
        self.client_sizes = [len(idx) for idx in data.client_indices]
        self.timings = Timings()
        self._round_sent = 0.0
        for sub in ("reconstructions", "observations"):
            (out / sub).mkdir(exist_ok=True)

    def evaluate_global(self, server_round: int, arrays):
        """The server's evaluation of the global model on the held-out half of its public split
        (the half the tiny CLIP was not pre-trained on) -> metrics.csv."""
        from flwr.app import MetricRecord

        self.progress.update(self.bar, description=f"round {server_round}: evaluating the global model")
        params = {n: p.to(self.task.device) for n, p in arrays.to_torch_state_dict().items()}
        held_out = self.data.public_eval
        metrics = accuracy(self.task, params, held_out.images, held_out.labels)
        path = self.out / "metrics.csv"
        row = pd.DataFrame([{"round": server_round, **metrics, **self.privacy(server_round)}])
        row.to_csv(path, mode="a", header=not path.exists(), index=False)
        return MetricRecord(metrics)

    def privacy(self, rounds: int) -> dict[str, float]:
        """The privacy the defense chain has bought after `rounds` rounds (epsilon at --dp-delta)."""
        from defenses.accounting import Accounting

        return self.defense.privacy(Accounting.from_config(self.cfg, self.client_sizes, rounds))

    def _attack_progress(self, done: int, total: int) -> None:
        self.progress.update(self.iter_bar, completed=done, total=total, visible=True)

    def round_sent(self, server_round: int) -> None:
        self._round_sent = time.perf_counter()
        self.progress.update(self.bar, description=f"round {server_round}: clients training")

    def replies_received(self, server_round: int, client_seconds: float) -> None:
        self.timings.waiting_for_clients += time.perf_counter() - self._round_sent
        self.timings.client_compute += client_seconds

    def __call__(self, obs: Observation) -> None:
        tag = f"round{obs.round}_client{obs.client}"
        obs.save(self.out / "observations" / f"{tag}.pt")
        self.progress.update(self.bar, description=f"round {obs.round}: attacking client {obs.client}")
        row = {"round": obs.round, "client": obs.client, "attack": self.cfg.attack,
               "defense": self.cfg.defense, "peft": self.cfg.peft, "model": self.cfg.model,
               "dataset": self.cfg.dataset, "batch_size": obs.batch_size, **self.privacy(obs.round)}
        if self.attack is not None:
            row.update(self._attack(obs, tag))
            self.writer.write(row)
        self.progress.advance(self.bar, len(obs.clients) or 1)  # an aggregate stands for its clients

    def examples_behind(self, obs: Observation):
        """The true examples behind an observation: one client's, or under secure aggregation
        those of every client in the aggregate."""
        parts = [client_examples(self.cfg, self.data, obs.round, c) for c in (obs.clients or (obs.client,))]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    def gallery_centre(self, round_: int, params) -> torch.Tensor:
        """The gallery's mean embedding under a round's global parameters, once per round."""
        if self._centre is None or self._centre[0] != round_:
            self._centre = (round_, mean_embedding(self.task, params, self.gallery))
        return self._centre[1]

    def _attack(self, obs: Observation, tag: str) -> dict:
        start = time.perf_counter()
        try:
            with single_cpu_thread(self.task.device):
                recon = self.attack.reconstruct(obs, self.task)
            true_images, true_labels = self.examples_behind(obs)
            metrics, order = evaluate(recon.images, recon.labels, true_images, true_labels, self.gallery)
            save_grid(self.out / "reconstructions" / f"{tag}.png",
                      [(true_images, true_labels), (recon.images[order], recon.labels[order])],
                      self.data.private.class_names)
            if "embeddings" in recon.extras:  # MIP: how close the recovered embeddings came
                params = {n: t.to(self.task.device) for n, t in obs.global_params.items()}
                metrics.update(embedding_similarity(self.task, params, recon.extras["embeddings"][order],
                                                    true_images, self.gallery_centre(obs.round, params)))
            result = {**metrics, "gradient_loss": recon.extras.get("gradient_loss"),
                      "prior": recon.extras.get("prior"), "status": "ok"}
        except Exception as exc:  # one failed attack must not lose the run: record it and go on
            with (self.out / "errors.log").open("a") as log:
                log.write(f"{tag}\n{traceback.format_exc()}\n")
            result = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
        finally:
            self.progress.update(self.iter_bar, visible=False)
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


def prepare_output(cfg: RunConfig) -> Path:
    out = Path(cfg.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    cfg.out = str(out)
    cfg.save(out / "config.yaml")
    return out


def run(cfg: RunConfig, console: Console | None = None, verbose: bool = False, grid=None) -> Path:
    """Run one configuration end to end; returns the output directory. With a Flower `grid`
    (inside a ServerApp started by `flwr run`, see fedsim.app) the rounds go to its nodes;
    otherwise `cfg.engine` simulates the clients."""
    console = console or Console()
    cfg.validate(attack_names(), defense_names())
    data = federated_data(cfg)  # checks the batch size against every client's data
    device = resolve_device(cfg.device)
    attack = make_attack(cfg)  # an attack that refuses its options fails here, before any work
    out = prepare_output(cfg)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    quiet_flower(verbose)
    spec = model_spec(cfg, data.private.class_names)
    task = build_task(spec, device)
    if not lpips_metric().available and cfg.attack != "none":
        console.print(f"[yellow]{lpips_metric().reason}[/]")

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as progress:
        pipeline = AttackPipeline(cfg, data, task, attack, out, progress)
        initial = {n: p.cpu() for n, p in task.trainable().items()}
        if grid is not None:
            serve(grid, cfg, initial, spec, pipeline, pipeline.evaluate_global)
        else:
            server_app = make_server_app(cfg, initial, spec, pipeline, pipeline.evaluate_global)
            simulate(cfg, server_app, make_client_app(cfg))
    timings = pipeline.timings.as_dict()
    (out / "timings.json").write_text(json.dumps(timings, indent=2))

    results = pd.read_csv(out / "results.csv")
    if len(results):
        console.print(summary_table(results))
    if (out / "metrics.csv").exists():
        acc = pd.read_csv(out / "metrics.csv")
        console.print(f"global accuracy on the held-out public split: {acc['accuracy'].iloc[0]:.1%} before round 1, "
                      f"{acc['accuracy'].iloc[-1]:.1%} after round {int(acc['round'].iloc[-1])}")
        for column, unit in (("epsilon", "example-level"), ("epsilon_client", "client-level")):
            if column in acc:
                console.print(f"privacy spent: {unit} epsilon {acc[column].iloc[-1]:.3g} at delta {cfg.dp_delta:g}")
    elif cfg.attack != "none":
        console.print("[red]no client update was attacked: see the Flower log above[/]")
    console.print(f"time: {timings['total_s']:.1f}s; waiting for clients (engine start-up + training) "
                  f"{timings['waiting_for_clients_s']:.1f}s, of which client compute "
                  f"{timings['client_compute_s']:.1f}s summed over clients; attacks {timings['attacks_s']:.1f}s")
    console.print(f"results in [bold]{out}[/]")
    return out


def simulate(cfg: RunConfig, server_app, client_app) -> None:
    """Flower's simulation engine on its Ray backend, or everything in this process."""
    if cfg.engine == "inprocess":
        from fedsim.engine import run_inprocess

        run_inprocess(server_app, client_app, cfg.clients)
        return
    from flwr.simulation import run_simulation

    # Ask Ray for GPUs only when there are some: a GPU request without CUDA hangs the simulation.
    gpus = CLIENT_GPU_SHARE if resolve_device(cfg.device) == "cuda" else 0.0
    backend_config = {"client_resources": {"num_cpus": 1, "num_gpus": gpus},
                      "init_args": {"include_dashboard": False, "log_to_driver": False}}
    run_simulation(server_app=server_app, client_app=client_app, num_supernodes=cfg.clients,
                   backend_name="ray", backend_config=backend_config)
