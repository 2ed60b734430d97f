"""Flower's SecAgg+ in fedsim: the curious server on Flower's legacy strategy API.

Flower 1.41 ships SecAgg+ (Bell et al., CCS 2020, on Bonawitz et al., CCS 2017) as
`flwr.server.workflow.SecAggPlusWorkflow`, run inside `DefaultWorkflow(fit_workflow=...)` with a
`LegacyContext` and a legacy `flwr.server.strategy.Strategy`, and as `secaggplus_mod` on the
ClientApp, which masks the client's legacy `FitRes`. Flower's Message-API strategies
(`flwr.serverapp.strategy`) have no SecAgg+ path, so under `--defense secagg` fedsim's server runs
`CuriousLegacyFedAvg` here instead of `fedsim.flower.CuriousFedAvg`, over the same `Grid`
(Flower's Ray simulation or fedsim's in-process engine).

What the server sees: each client's masked, quantised vector (sent to the workflow, summed
there, never handed to the strategy) and, after unmasking, the example-weighted average of the
sampled clients' updates. `SecAggPlusWorkflow.unmask_stage` puts that average into every
result's `FitRes.parameters` before it calls `aggregate_fit`, which is where the curious server
copies it: one Observation of all the clients' examples together (client -1, `clients` names
them). The per-client metrics (examples, training time, client id) travel in the clear, as
in Flower.
"""

from __future__ import annotations

import json

import numpy as np
import torch
from flwr.app import ArrayRecord, Context, Message, RecordDict
from flwr.common import Code, FitRes, Parameters, Status, ndarrays_to_parameters, parameters_to_ndarrays
from flwr.compat.common import recorddict_compat as compat
from flwr.server import LegacyContext, ServerConfig
from flwr.server.strategy import FedAvg as LegacyFedAvg
from flwr.server.workflow import DefaultWorkflow

from fedsim.config import RunConfig
from fedsim.protocol import Protocol, observation

FITINS_KEY = "fitins.parameters"  # where a legacy FitIns keeps the global parameters
ROUND_KEY, NAMES_KEY = "server-round", "param-names"


def is_legacy_fit(msg: Message) -> bool:
    """A train message in the legacy FitIns layout (the SecAgg+ workflow sends those)."""
    return FITINS_KEY in msg.content.array_records


def fit_instructions(msg: Message) -> tuple[int, dict[str, torch.Tensor]]:
    """The round and the named global parameters of a legacy FitIns message."""
    fitins = compat.recorddict_to_fitins(msg.content, keep_input=True)
    names = json.loads(str(fitins.config[NAMES_KEY]))
    arrays = parameters_to_ndarrays(fitins.parameters)
    return int(fitins.config[ROUND_KEY]), {n: torch.from_numpy(np.array(a)) for n, a in zip(names, arrays, strict=True)}


def fit_reply(msg: Message, update: dict[str, torch.Tensor], n: int, client: int, seconds: float) -> Message:
    """The client's update as a legacy FitRes, which `secaggplus_mod` masks before it leaves."""
    params = ndarrays_to_parameters([u.numpy() for u in update.values()])
    fitres = FitRes(status=Status(Code.OK, ""), parameters=params, num_examples=n,
                    metrics={"client-id": client, "train-seconds": seconds})
    return Message(content=compat.fitres_to_recorddict(fitres, keep_input=True), reply_to=msg)


class CuriousLegacyFedAvg(LegacyFedAvg):
    """fedsim's curious FedAvg (see fedsim.flower.CuriousFedAvg) on Flower's legacy API, for SecAgg+.

    `aggregate_fit` receives, in every result, the already unmasked example-weighted average of
    the updates; it hands that to the listener as one Observation and takes the FedAvg/FedSGD
    step from it. No individual update ever reaches this class.
    """

    def __init__(self, cfg: RunConfig, spec: dict, listener, initial: dict[str, torch.Tensor],
                 evaluate_fn=None, **kwargs):
        super().__init__(**kwargs)
        self.protocol, self.spec, self.listener, self.evaluate_fn = Protocol.of(cfg), spec, listener, evaluate_fn
        self.names = list(initial)
        self.initial = initial
        self._global: dict[str, torch.Tensor] = {}

    def named(self, parameters: Parameters) -> dict[str, torch.Tensor]:
        arrays = parameters_to_ndarrays(parameters)
        return {n: torch.from_numpy(np.array(a)).to(self.initial[n].dtype)
                for n, a in zip(self.names, arrays, strict=True)}

    def initialize_parameters(self, client_manager):
        return ndarrays_to_parameters([self.initial[n].numpy() for n in self.names])

    def configure_fit(self, server_round, parameters, client_manager):
        self._global = self.named(parameters)
        instructions = super().configure_fit(server_round, parameters, client_manager)
        for _, fitins in instructions:
            fitins.config.update({ROUND_KEY: server_round, NAMES_KEY: json.dumps(self.names)})
        self.listener.round_sent(server_round)
        return instructions

    def aggregate_fit(self, server_round, results, failures):
        self.listener.replies_received(server_round, sum(float(r.metrics.get("train-seconds", 0.0))
                                                         for _, r in results))
        if not results:  # every client failed: keep the global model
            return None, {}
        mean = self.named(results[0][1].parameters)  # SecAgg+ wrote the unmasked average into every FitRes
        self.listener(observation(self.protocol, server_round, -1, mean, self._global,
                                  sum(r.num_examples for _, r in results), self.spec,
                                  clients=tuple(int(r.metrics["client-id"]) for _, r in results),
                                  steps_examples=results[0][1].num_examples))
        new = self.protocol.next_weights(self._global, mean)
        return ndarrays_to_parameters([new[n].numpy() for n in self.names]), {}

    def evaluate(self, server_round, parameters):
        if self.evaluate_fn is None:
            return None
        metrics = self.evaluate_fn(server_round, ArrayRecord(self.named(parameters)))
        return float(metrics["loss"]), {"accuracy": float(metrics["accuracy"])}


def serve_secure(grid, cfg: RunConfig, initial: dict[str, torch.Tensor], spec: dict, listener, workflow,
                 evaluate_fn=None, fraction: float = 1.0, clients_per_round: int = 2) -> None:
    """The curious server's rounds through Flower's DefaultWorkflow with `workflow` (SecAgg+) as
    its fit stage."""
    strategy = CuriousLegacyFedAvg(cfg, spec, listener, initial, evaluate_fn,
                                   fraction_fit=fraction, fraction_evaluate=0.0,
                                   min_fit_clients=clients_per_round, min_evaluate_clients=0,
                                   min_available_clients=cfg.clients)
    context = LegacyContext(Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=RecordDict(),
                                    run_config={}),
                            config=ServerConfig(num_rounds=cfg.rounds), strategy=strategy)
    DefaultWorkflow(fit_workflow=workflow)(grid, context)
