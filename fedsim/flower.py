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
import sys
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

from fedsim.config import ConfigError, RunConfig
from fedsim.data import federated_data
from fedsim.models import build_task, derive_seed, model_spec, resolve_device
from fedsim.observation import Observation
from fedsim.plugins import make_defense
from fedsim.secagg import fit_instructions, fit_reply, is_legacy_fit, serve_secure
from fedsim.training import client_examples, local_steps, local_update

UPDATE_KEY, METRICS_KEY, CLIENT_KEY = "arrays", "metrics", "client"


# ---------------------------------------------------------------------------------- client


def _in_ray_worker() -> bool:
    ray = sys.modules.get("ray")
    return ray is not None and ray.is_initialized()


@lru_cache(maxsize=2)
def _client_state(cfg_json: str):
    """Data, model and defense, built once per worker process and reused across clients."""
    cfg = RunConfig.from_dict(json.loads(cfg_json))
    if _in_ray_worker():
        torch.set_num_threads(1)  # one Ray CPU per client actor: do not oversubscribe the cores
    data = federated_data(cfg)
    device = resolve_device("cpu" if cfg.device == "cpu" else "auto")
    return cfg, data, build_task(model_spec(cfg, data.private.class_names), device), make_defense(cfg)


def client_update(cfg_json: str, client: int, round_: int, params: dict[str, torch.Tensor]):
    """One client's round: its (defended) update and the number of examples behind it."""
    cfg, data, task, defense = _client_state(cfg_json)
    images, labels = client_examples(cfg, data, round_, client)
    params = {n: p.to(task.device) for n, p in params.items()}
    generator = torch.Generator().manual_seed(derive_seed(cfg.seed, round_, client, "defense"))
    update = local_update(cfg, task, defense, images.to(task.device), labels.to(task.device), params,
                          generator, round_, client)
    return {n: g.detach().cpu() for n, g in update.items()}, len(labels)


def as_weights(cfg: RunConfig, update: dict[str, torch.Tensor], params: dict[str, torch.Tensor]):
    """An update expressed as the weights it leads to, global + step (FedSGD's step is -lr * gradient),
    the form Flower's DP mods expect a reply in."""
    scale = -cfg.lr if cfg.protocol == "fedsgd" else 1.0
    return {n: params[n] + scale * u for n, u in update.items()}


def from_weights(cfg: RunConfig, weights: dict[str, torch.Tensor], params: dict[str, torch.Tensor]):
    """The inverse of `as_weights`."""
    scale = -1.0 / cfg.lr if cfg.protocol == "fedsgd" else 1.0
    return {n: (w - params[n]) * scale for n, w in weights.items()}


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
            update = as_weights(run_cfg, update, params)
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

    FedSGD replies are gradients: their weighted average is applied as one SGD step of size lr.
    FedAvg replies are weight deltas: their weighted average is added to the global weights.

    With a defense whose clients reply with weights (flower-dp), the average of the replies is the
    new global model and each reply is turned back into an update before it is observed. Secure
    aggregation (secagg) runs Flower's SecAgg+ with fedsim.secagg.CuriousLegacyFedAvg instead.
    """

    def __init__(self, cfg: RunConfig, spec: dict, listener: Listener, **kwargs):
        super().__init__(**kwargs)
        self.cfg = cfg
        self.spec = spec
        self.listener = listener
        self._global: dict[str, torch.Tensor] = {}
        defense = make_defense(cfg)
        self.replies_with_weights = defense.replies_with_weights

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
        observations = [self.observe(server_round, m) for m in replies if not m.has_error()]
        for obs in observations:
            self.listener(obs)
        mean_grad, metrics = super().aggregate_train(server_round, replies)
        if mean_grad is None:  # every client failed: keep the global model
            return None, metrics
        if self.replies_with_weights:  # the average of the replies is already the new global model
            return mean_grad, metrics
        mean = mean_grad.to_torch_state_dict()
        scale = -self.cfg.lr if self.cfg.protocol == "fedsgd" else 1.0
        new = {n: p + scale * mean[n].to(p.dtype) for n, p in self._global.items()}
        return ArrayRecord(new), metrics

    def observe(self, server_round: int, msg: Message) -> Observation:
        content = msg.content
        n = int(content[METRICS_KEY]["num-examples"])
        fedsgd = self.cfg.protocol == "fedsgd"
        update = content[UPDATE_KEY].to_torch_state_dict()
        if self.replies_with_weights:
            update = from_weights(self.cfg, update, self._global)
        return Observation(
            round=server_round,
            client=int(content[CLIENT_KEY]["client-id"]),
            kind="gradient" if fedsgd else "delta",
            update=update,
            global_params={name: p.clone() for name, p in self._global.items()},
            batch_size=n,
            lr=self.cfg.lr,
            local_steps=1 if fedsgd else local_steps(self.cfg, n),
            model_spec=self.spec,
        )


def aggregate(observations: list[Observation]) -> Observation:
    """What secure aggregation leaves the server: the example-weighted average of the updates,
    as one observation of all the clients' examples together (client -1; `clients` names them).
    Formed from plain observations, offline (experiments/defense_tradeoff.py); a run under
    `--defense secagg` gets it from Flower's SecAgg+ (fedsim.secagg)."""
    first, total = observations[0], sum(o.batch_size for o in observations)
    update = {n: sum(o.update[n] * (o.batch_size / total) for o in observations) for n in first.update}
    return Observation(round=first.round, client=-1, kind=first.kind, update=update,
                       global_params=first.global_params, batch_size=total, lr=first.lr,
                       local_steps=first.local_steps, model_spec=first.model_spec,
                       clients=tuple(o.client for o in observations))


def clients_per_round(cfg: RunConfig) -> int:
    return max(1, int(cfg.clients * cfg.fraction))


def make_server_app(cfg: RunConfig, initial: dict[str, torch.Tensor], spec: dict, listener: Listener,
                    evaluate_fn=None) -> ServerApp:
    """`evaluate_fn(round, ArrayRecord) -> MetricRecord`: the server's own evaluation of the
    global model on its public split, before round 1 and after every round."""
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        serve(grid, cfg, initial, spec, listener, evaluate_fn)

    return app


def serve(grid: Grid, cfg: RunConfig, initial: dict[str, torch.Tensor], spec: dict, listener: Listener,
          evaluate_fn=None) -> None:
    """The curious FedAvg strategy's rounds over the nodes of `grid`; under secure aggregation,
    Flower's SecAgg+ workflow with the legacy-API curious strategy (fedsim.secagg)."""
    defense = make_defense(cfg)
    workflow = defense.fit_workflow(cfg)
    if workflow is not None:
        serve_secure(grid, cfg, initial, spec, listener, workflow, evaluate_fn, fraction=cfg.fraction,
                     clients_per_round=clients_per_round(cfg))
        return
    strategy = defense.wrap_strategy(CuriousFedAvg(
        cfg=cfg, spec=spec, listener=listener,
        fraction_train=cfg.fraction, fraction_evaluate=0.0,
        min_train_nodes=clients_per_round(cfg), min_available_nodes=cfg.clients,
    ))
    strategy.start(grid=grid, initial_arrays=ArrayRecord(initial), num_rounds=cfg.rounds,
                   evaluate_fn=evaluate_fn)


def quiet_flower(verbose: bool) -> None:
    """Flower's round-by-round log, its deprecation notice for the Python simulation API and
    Ray's accelerator tip are noise next to fedsim's progress bar; --verbose shows them."""
    logger = logging.getLogger("flwr")
    logger.setLevel(logging.INFO if verbose else logging.ERROR)
    logger.propagate = False  # Flower has its own handler; the root one would print it twice
    if not verbose:
        warnings.filterwarnings("ignore", message=".*Ray will no longer override accelerator")
