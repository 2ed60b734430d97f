"""The Flower side: a ClientApp that trains on its private data behind a defense, and a
ServerApp whose FedAvg strategy is honest but curious.

Clients send an update (FedSGD: a gradient; FedAvg: a weight delta, see fedsim.training).
The strategy averages the updates as FedAvg does (weighted by examples) and turns the average
into the next global weights. Before aggregating, it turns every reply into an Observation and
hands it to its listener (the attack pipeline).
"""

from __future__ import annotations

import json
import logging
import random
import sys
import time
import typing
import warnings
from collections.abc import Iterable
from functools import lru_cache

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedsim.config import ConfigError, RunConfig
from fedsim.harness import Setting
from fedsim.interrupts import StopSignal
from fedsim.models import derive_seed, resolve_device
from fedsim.observation import Observation
from fedsim.plugins import make_defense
from fedsim.protocol import Protocol, observation
from fedsim.secagg import fit_instructions, fit_reply, is_legacy_fit, serve_secure

UPDATE_KEY, METRICS_KEY, CLIENT_KEY = "arrays", "metrics", "client"


# ---------------------------------------------------------------------------------- client


def _in_ray_worker() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@lru_cache(maxsize=2)
def _client_setting(cfg_json: str) -> Setting:
    """The client's data, model and defense, built once per worker process and reused across clients."""
    cfg = RunConfig.from_dict(json.loads(cfg_json))
    if _in_ray_worker():
        torch.set_num_threads(1)  # one Ray CPU per client actor: do not oversubscribe the cores
    return Setting(cfg, resolve_device("cpu" if cfg.device == "cpu" else "auto"))


def client_update(cfg_json: str, client: int, round_: int, params: dict[str, torch.Tensor]):
    """One client's round: its (defended) update and the number of examples behind it."""
    return _client_setting(cfg_json).client_update(round_, client, params)


def make_client_app(cfg: RunConfig | None = None) -> ClientApp:
    """The ClientApp for `cfg`, or, without one, for the RunConfig in each message's run config
    (`flwr run`, see fedsim.app). Flower fixes a ClientApp's mods when it is built, so defenses
    that work through a Flower mod (flower-dp) need `cfg` here."""
    app = ClientApp(mods=make_defense(cfg).client_mods() if cfg is not None else [])
    fixed_json = None if cfg is None else json.dumps(cfg.to_dict(), sort_keys=True)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        run_cfg = cfg or RunConfig.from_run_config(context.run_config)
        cfg_json = fixed_json or json.dumps(run_cfg.to_dict(), sort_keys=True)
        defense = make_defense(run_cfg)
        if cfg is None and defense.client_mods():
            raise ConfigError(f"--defense {run_cfg.defense} works through a Flower client mod, which "
                              "`flwr run` cannot install per run; use `fedsim run`")
        client = int(context.node_config["partition-id"])
        legacy = is_legacy_fit(msg)  # SecAgg+ (fedsim.secagg) speaks Flower's legacy FitIns/FitRes
        if legacy:
            round_, params = fit_instructions(msg)
        else:
            round_ = int(msg.content["config"]["server-round"])
            params = msg.content["arrays"].to_torch_state_dict()
        start = time.perf_counter()
        update, n = client_update(cfg_json, client, round_, params)
        if legacy:
            return fit_reply(msg, update, n, client, time.perf_counter() - start)
        if defense.replies_with_weights:
            update = Protocol.of(run_cfg).as_weights(update, params)
        reply = RecordDict({
            UPDATE_KEY: ArrayRecord(update),
            METRICS_KEY: MetricRecord({"num-examples": n, "train-seconds": time.perf_counter() - start}),
            CLIENT_KEY: ConfigRecord({"client-id": client}),
        })
        return Message(content=reply, reply_to=msg)

    return app


# ---------------------------------------------------------------------------------- server


class Listener(typing.Protocol):
    """What the curious server reports to: the attack pipeline."""

    def round_sent(self, server_round: int) -> None: ...
    def replies_received(self, server_round: int, client_seconds: float) -> None: ...
    def __call__(self, observation: Observation) -> None: ...


class CuriousFedAvg(FedAvg):
    """FedAvg that runs the protocol faithfully but copies every reply into an Observation.

    FedSGD replies are gradients: their weighted average is applied as one SGD step of size lr.
    FedAvg replies are weight deltas: their weighted average is added to the global weights.

    With a defense whose clients reply with weights (flower-dp), the average of the replies is the
    new global model and each reply is turned back into an update before it is observed. Secure
    aggregation (secagg) runs Flower's SecAgg+ with fedsim.secagg.CuriousLegacyFedAvg instead.
    """

    def __init__(self, cfg: RunConfig, spec: dict, listener: Listener, **kwargs):
        super().__init__(**kwargs)
        self.protocol = Protocol.of(cfg)
        self.spec = spec
        self.listener = listener
        self._global: dict[str, torch.Tensor] = {}
        self.replies_with_weights = make_defense(cfg).replies_with_weights

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays.to_torch_state_dict()
        messages = super().configure_train(server_round, arrays, config, grid)
        self.listener.round_sent(server_round)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        # Replies arrive in the order clients were sampled or finished; summed in client order,
        # the average (so the next global model) is the same to the last bit in every run.
        replies = sorted(replies, key=lambda m: -1 if m.has_error() else int(m.content[CLIENT_KEY]["client-id"]))
        self.listener.replies_received(server_round, sum(
            float(m.content[METRICS_KEY].get("train-seconds", 0.0)) for m in replies if not m.has_error()))
        observations = [self.observe(server_round, m) for m in replies if not m.has_error()]
        for obs in observations:
            self.listener(obs)
        mean_grad, metrics = super().aggregate_train(server_round, replies)
        if mean_grad is None:  # every client failed: keep the global model
            return None, metrics
        if self.replies_with_weights:  # the average of the replies is already the new global model
            return mean_grad, metrics
        return ArrayRecord(self.protocol.next_weights(self._global, mean_grad.to_torch_state_dict())), metrics

    def observe(self, server_round: int, msg: Message) -> Observation:
        content = msg.content
        update = content[UPDATE_KEY].to_torch_state_dict()
        if self.replies_with_weights:
            update = self.protocol.from_weights(update, self._global)
        return observation(self.protocol, server_round, int(content[CLIENT_KEY]["client-id"]), update,
                           self._global, int(content[METRICS_KEY]["num-examples"]), self.spec)


class WatchedGrid(Grid):
    """A Grid that waits for replies as Flower's grids do, with two limits the server needs:
    it stops waiting after --client-timeout seconds (a client that has not answered by then is
    missing from the round, as under Flower's own timeout), and when the run is asked to stop
    (Ctrl-C, SIGTERM), which Flower's wait would not notice."""

    POLL_S = 0.05

    def __init__(self, grid: Grid, timeout: float, stop: StopSignal | None = None):
        self.grid, self.timeout, self.stop = grid, timeout, stop or StopSignal()
        self.unanswered = 0  # messages whose reply did not come within the timeout

    def set_run(self, run) -> None:
        self.grid.set_run(run)

    @property
    def run(self):
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        limit = min(self.timeout, timeout) if timeout is not None else self.timeout
        waiting = set(self.push_messages(messages))
        deadline, replies = time.monotonic() + limit, []
        while waiting and time.monotonic() < deadline:
            self.stop.check()
            got = list(self.pull_messages(waiting))
            replies += got
            waiting -= {reply.metadata.reply_to_message_id for reply in got}
            if waiting:
                time.sleep(self.POLL_S)
        self.stop.check()
        self.unanswered += len(waiting)
        return replies


def make_server_app(cfg: RunConfig, initial: dict[str, torch.Tensor], spec: dict, listener: Listener,
                    evaluate_fn=None, stop: StopSignal | None = None) -> ServerApp:
    """`evaluate_fn(round, ArrayRecord) -> MetricRecord`: the server's own evaluation of the
    global model on its public split, before round 1 and after every round."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, cfg, initial, spec, listener, evaluate_fn, stop)

    return app


def serve(grid: Grid, cfg: RunConfig, initial: dict[str, torch.Tensor], spec: dict, listener: Listener,
          evaluate_fn=None, stop: StopSignal | None = None) -> None:
    """The curious FedAvg strategy's rounds over the nodes of `grid`; under secure aggregation,
    Flower's SecAgg+ workflow with the legacy-API curious strategy (fedsim.secagg)."""
    grid = WatchedGrid(grid, cfg.client_timeout, stop)
    # Flower samples each round's clients with Python's `random`: seeded from the public model
    # seed (the server's, never the clients' data seed), a rerun or a --resume samples the same.
    random.seed(derive_seed(cfg.model_seed, "client sampling"))
    try:
        _rounds(grid, cfg, initial, spec, listener, evaluate_fn)
    finally:
        if grid.unanswered:
            end_client_actors()


def _rounds(grid: Grid, cfg: RunConfig, initial: dict[str, torch.Tensor], spec: dict, listener: Listener,
            evaluate_fn) -> None:
    defense = make_defense(cfg)
    workflow = defense.fit_workflow(max_examples(cfg))
    if workflow is not None:
        serve_secure(grid, cfg, initial, spec, listener, workflow, evaluate_fn, fraction=cfg.fraction,
                     clients_per_round=Protocol.of(cfg).sampled_clients)
        return
    strategy = defense.wrap_strategy(CuriousFedAvg(
        cfg=cfg, spec=spec, listener=listener,
        fraction_train=cfg.fraction, fraction_evaluate=0.0,
        min_train_nodes=Protocol.of(cfg).sampled_clients, min_available_nodes=cfg.clients,
    ))
    strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=cfg.rounds,
                   evaluate_fn=evaluate_fn)


def end_client_actors() -> None:
    """Flower's simulation engine waits for every client call it started, even one the server
    gave up on (--client-timeout), so a client that never answers would hold the run open
    forever. Once the rounds are over, end the Ray client actors this process started (its own
    descendants only; under `flwr run` the clients are other machines' and nothing is touched)."""
    import psutil

    for proc in psutil.Process().children(recursive=True):
        try:
            if proc.cmdline()[:1] and proc.cmdline()[0].startswith("ray::ClientAppActor"):
                proc.kill()
        except psutil.Error:
            continue  # already gone


def max_examples(cfg: RunConfig) -> int:
    """The most examples behind one client's update (SecAgg+'s `max_weight`): the batch, or with
    local epochs the largest client's data (FedAvg's example counts travel in the clear)."""
    if Protocol.of(cfg).uses_epochs:
        return max(len(idx) for idx in Setting(cfg).data.client_indices)
    return cfg.batch_size


def quiet_flower(verbose: bool) -> None:
    """Flower's round-by-round log, its deprecation notice for the Python simulation API and
    Ray's accelerator tip are noise next to fedsim's progress bar; --verbose shows them."""
    logger = logging.getLogger("flwr")
    logger.setLevel(logging.INFO if verbose else logging.ERROR)
    logger.propagate = False  # Flower has its own handler; the root one would print it twice
    if not verbose:
        warnings.filterwarnings("ignore", message=".*Ray will no longer override accelerator")
