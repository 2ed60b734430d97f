"""The Flower side: a ClientApp that trains on its private batch behind a defense, and a
ServerApp whose FedAvg strategy is honest but curious.

FedSGD: each client sends the gradient of one batch; FedAvg's weighted average of those
gradients is applied by the server as one SGD step. Before aggregating, the strategy turns
every reply into an Observation and hands it to `on_observation` (the attack pipeline).
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Iterable
from functools import lru_cache
from typing import Protocol

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedsim.config import RunConfig
from fedsim.data import federated_data
from fedsim.models import build_task, derive_seed, model_spec
from fedsim.observation import Observation
from fedsim.plugins import make_defense

UPDATE_KEY, METRICS_KEY, CLIENT_KEY = "arrays", "metrics", "client"


# ---------------------------------------------------------------------------------- client


@lru_cache(maxsize=2)
def _client_state(cfg_json: str):
    """Data, model and defense, built once per worker process and reused across clients."""
    cfg = RunConfig.from_dict(json.loads(cfg_json))
    torch.set_num_threads(1)  # one Ray CPU per client: do not oversubscribe the cores
    data = federated_data(cfg)
    return cfg, data, build_task(model_spec(cfg, data.private.class_names)), make_defense(cfg)


def client_update(cfg_json: str, client: int, round_: int, params: dict[str, torch.Tensor]):
    """One client's FedSGD step: the (defended) gradient of its seeded batch."""
    cfg, data, task, defense = _client_state(cfg_json)
    images, labels = data.client_batch(cfg, round_, client)
    params = {n: p.to(task.device) for n, p in params.items()}
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, round_, client, "defense"))
    grads = defense.gradient(task, params, images.to(task.device), labels.to(task.device), generator)
    update = defense.transform_update(grads, generator)
    return {n: g.detach().cpu() for n, g in update.items()}, len(labels)


def make_client_app(cfg: RunConfig) -> ClientApp:
    app = ClientApp()
    cfg_json = json.dumps(cfg.to_dict(), sort_keys=True)

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        client = int(context.node_config["partition-id"])
        round_ = int(msg.content["config"]["server-round"])
        params = msg.content["arrays"].to_torch_state_dict()
        start = time.perf_counter()
        update, n = client_update(cfg_json, client, round_, params)
        reply = RecordDict({
            UPDATE_KEY: ArrayRecord(update),
            METRICS_KEY: MetricRecord({"num-examples": n, "train-seconds": time.perf_counter() - start}),
            CLIENT_KEY: ConfigRecord({"client-id": client}),
        })
        return Message(content=reply, reply_to=msg)

    return app


# ---------------------------------------------------------------------------------- server


class Listener(Protocol):
    """What the curious server reports to: the attack pipeline."""

    def round_sent(self, server_round: int) -> None: ...
    def replies_received(self, server_round: int, client_seconds: float) -> None: ...
    def __call__(self, observation: Observation) -> None: ...


class CuriousFedAvg(FedAvg):
    """FedAvg that runs the protocol faithfully but copies every reply into an Observation.

    Replies are FedSGD gradients: the weighted average is applied as one SGD step of size `lr`.
    """

    def __init__(self, lr: float, spec: dict, listener: Listener, **kwargs):
        super().__init__(**kwargs)
        self.lr = lr
        self.spec = spec
        self.listener = listener
        self._global: dict[str, torch.Tensor] = {}

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._global = arrays.to_torch_state_dict()
        messages = super().configure_train(server_round, arrays, config, grid)
        self.listener.round_sent(server_round)
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable[Message]):
        replies = list(replies)
        self.listener.replies_received(server_round, sum(
            float(m.content[METRICS_KEY].get("train-seconds", 0.0)) for m in replies if not m.has_error()))
        for msg in replies:
            if not msg.has_error():
                self.listener(self.observe(server_round, msg))
        mean_grad, metrics = super().aggregate_train(server_round, replies)
        if mean_grad is None:
            return None, metrics
        step = mean_grad.to_torch_state_dict()
        new = {n: p - self.lr * step[n].to(p.dtype) for n, p in self._global.items()}
        return ArrayRecord(new), metrics

    def observe(self, server_round: int, msg: Message) -> Observation:
        content = msg.content
        return Observation(
            round=server_round,
            client=int(content[CLIENT_KEY]["client-id"]),
            kind="gradient",
            update=content[UPDATE_KEY].to_torch_state_dict(),
            global_params={n: p.clone() for n, p in self._global.items()},
            batch_size=int(content[METRICS_KEY]["num-examples"]),
            lr=self.lr,
            local_steps=1,
            model_spec=self.spec,
        )


def make_server_app(cfg: RunConfig, initial: dict[str, torch.Tensor], spec: dict,
                    listener: Listener) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = CuriousFedAvg(
            lr=cfg.lr, spec=spec, listener=listener,
            fraction_train=1.0, fraction_evaluate=0.0,
            min_train_nodes=cfg.clients, min_available_nodes=cfg.clients,
        )
        strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=cfg.rounds)

    return app


def quiet_flower(verbose: bool) -> None:
    """Flower's round-by-round log, its deprecation notice for the Python simulation API and
    Ray's accelerator tip are noise next to fedsim's progress bar; --verbose shows them."""
    logger = logging.getLogger("flwr")
    logger.setLevel(logging.INFO if verbose else logging.ERROR)
    logger.propagate = False  # Flower has its own handler; the root one would print it twice
    if not verbose:
        warnings.filterwarnings("ignore", message=".*Ray will no longer override accelerator")
