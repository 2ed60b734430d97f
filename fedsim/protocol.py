"""The federated protocol's update rule, in one place: what a client's update is, how the server
turns the average of the updates into the next global weights, and how an update and the weights
it leads to convert into each other. Used by both curious servers (fedsim.flower, fedsim.secagg),
the clients (fedsim.training), the accountant (fedsim.accounting) and the Observation.

FedSGD: a client sends the gradient g of one batch; the server steps w <- w - lr * mean(g).
FedAvg: a client takes `steps` SGD steps of size lr and sends the delta d = w_local - w; the
server adds mean(d). A delta is read as the pseudo-gradient -d / (lr * steps), exact for one step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

Params = dict[str, torch.Tensor]
PROTOCOLS = ("fedsgd", "fedavg")
UPDATE_KINDS = ("gradient", "delta")


@dataclass(frozen=True)
class Protocol:
    """The training plan the server sets and every client follows; all of it is public."""

    name: str = "fedsgd"  # fedsgd | fedavg
    lr: float = 0.01
    batch_size: int = 1
    local_steps: int = 1  # fedavg: SGD steps on the round's batch
    local_epochs: int = 0  # fedavg: if > 0, passes over all the client's data instead
    clients: int = 10
    fraction: float = 1.0
    rounds: int = 1

    @classmethod
    def of(cls, cfg) -> "Protocol":
        return cls(cfg.protocol, cfg.lr, cfg.batch_size, cfg.local_steps, cfg.local_epochs, cfg.clients,
                   cfg.fraction, cfg.rounds)

    @property
    def update_kind(self) -> str:
        return "gradient" if self.name == "fedsgd" else "delta"

    @property
    def sampled_clients(self) -> int:
        """Clients asked for an update each round."""
        return max(1, int(self.clients * self.fraction))

    @property
    def uses_epochs(self) -> bool:
        return self.name == "fedavg" and self.local_epochs > 0

    def steps_behind(self, n_examples: int) -> int:
        """SGD steps behind one client's update of `n_examples` examples."""
        if self.name == "fedsgd":
            return 1
        if self.uses_epochs:
            return self.local_epochs * -(-n_examples // self.batch_size)
        return self.local_steps

    @property
    def step_scale(self) -> float:
        """The factor that turns an update into a step of the weights."""
        return -self.lr if self.name == "fedsgd" else 1.0

    def next_weights(self, weights: Params, mean_update: Params) -> Params:
        """The server's step: the global weights after applying the mean update."""
        return {n: w + self.step_scale * mean_update[n].to(w.dtype) for n, w in weights.items()}

    def as_weights(self, update: Params, weights: Params) -> Params:
        """An update as the weights it leads to (the form Flower's DP mods expect a reply in)."""
        return {n: weights[n] + self.step_scale * u for n, u in update.items()}

    def from_weights(self, replied: Params, weights: Params) -> Params:
        """The inverse of `as_weights`."""
        return {n: (r - weights[n]) / self.step_scale for n, r in replied.items()}


def weighted_mean(updates: list[tuple[Params, int]]) -> Params:
    """The example-weighted average of (update, examples) pairs: what FedAvg's server aggregates."""
    total = sum(n for _, n in updates)
    return {name: sum(u[name] * (n / total) for u, n in updates) for name in updates[0][0]}


def pseudo_gradient(kind: str, update: Params, lr: float, steps: int) -> Params:
    """An update as a gradient: itself, or a delta's -delta / (lr * steps)."""
    if kind == "gradient":
        return update
    scale = -1.0 / (lr * steps)
    return {n: d * scale for n, d in update.items()}


def observation(protocol: Protocol, server_round: int, client: int, update: Params, weights: Params,
                n_examples: int, model_spec: dict[str, Any], clients: tuple[int, ...] = (),
                steps_examples: int | None = None):
    """The Observation of one reply (or, under secure aggregation, of the aggregate: client -1,
    `clients` naming the clients behind it, `steps_examples` one client's examples). Every
    curious server builds its Observations here."""
    from fedsim.observation import Observation

    return Observation(round=server_round, client=client, kind=protocol.update_kind, update=update,
                       global_params={n: p.clone() for n, p in weights.items()}, batch_size=n_examples,
                       lr=protocol.lr, local_steps=protocol.steps_behind(steps_examples or n_examples),
                       model_spec=model_spec, clients=clients)
