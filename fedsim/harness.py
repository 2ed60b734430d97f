"""Observe, attack and score without Flower: the steps of `fedsim run` for experiments,
benchmarks and tests, so none of them copies the loop.

    setting = Setting(RunConfig(model="lenet", peft="full", attack="dlg"))
    observation, truth = setting.observe(round_=1, client=0)   # what the server sees; the truth apart
    reconstruction = setting.attack().reconstruct(observation, setting.task)
    row = setting.scorer().row(observation, reconstruction, truth)

The client's side (its batch, the defense, the protocol's update) is the same code the Flower
ClientApp runs (`Setting.client_update`); the Observation comes from the one builder both curious
servers use (`fedsim.protocol.observation`); the attack is built from the server's knowledge only.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import torch

from fedsim.config import RunConfig
from fedsim.data import federated_data
from fedsim.evaluate import embedding_similarity, evaluate, mean_embedding
from fedsim.knowledge import AttackerKnowledge
from fedsim.models import build_task, derive_seed, resolve_device
from fedsim.observation import Observation
from fedsim.options import ConfigError
from fedsim.plugins import make_attack, make_defense
from fedsim.protocol import Protocol, observation, weighted_mean
from fedsim.training import client_examples, local_update

GALLERY_SIZE = 256  # public images in the identifiability gallery


@dataclass(frozen=True)
class Truth:
    """The examples behind an observation: for scoring only, never handed to an attack."""

    images: torch.Tensor
    labels: torch.Tensor


class Setting:
    """One configuration's world without Flower: the clients' data, the public model, the defense
    chain and the server's knowledge, each built on first use."""

    def __init__(self, cfg: RunConfig, device: str | None = None):
        self.cfg = cfg
        self.device = device or resolve_device(cfg.device)
        self.protocol = Protocol.of(cfg)
        self._trajectory: dict[int, dict[str, torch.Tensor]] = {}  # round -> global weights after it

    @cached_property
    def data(self):
        return federated_data(self.cfg)

    @cached_property
    def knowledge(self) -> AttackerKnowledge:
        return AttackerKnowledge.of(self.cfg)

    @property
    def spec(self) -> dict[str, Any]:
        return self.knowledge.model_spec

    @cached_property
    def task(self):
        return build_task(self.spec, self.device)

    @cached_property
    def defense(self):
        return make_defense(self.cfg)

    def attack(self, progress=None, **options):
        """The configured attack (or, with `options`, the same attack with those options changed,
        by key: `attack_iters=50`), built from the server's knowledge."""
        cfg = RunConfig(**{**self.cfg.to_dict(), **options}) if options else self.cfg
        return make_attack(cfg, self.knowledge, progress=progress)

    # -- the client's side ---------------------------------------------------------------------
    def truth(self, round_: int, clients: tuple[int, ...]) -> Truth:
        parts = [client_examples(self.cfg, self.data, round_, c) for c in clients]
        return Truth(torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts]))

    def client_update(self, round_: int, client: int, params: dict[str, torch.Tensor],
                      examples: tuple[torch.Tensor, torch.Tensor] | None = None):
        """One client's round, as its ClientApp computes it: the defended update and the number of
        examples behind it. `examples` (images, labels) stands in for the client's seeded batch."""
        images, labels = examples if examples is not None else client_examples(self.cfg, self.data, round_, client)
        params = {n: p.to(self.task.device) for n, p in params.items()}
        generator = torch.Generator().manual_seed(derive_seed(self.cfg.seed, round_, client, "defense"))
        update = local_update(self.protocol, self.task, self.defense, images.to(self.task.device),
                              labels.to(self.task.device), params, generator, (self.cfg.seed, round_, client))
        return {n: g.detach().cpu() for n, g in update.items()}, len(labels)

    def global_weights(self, round_: int) -> dict[str, torch.Tensor]:
        """The global model at the start of a round as the run's server computes it: the initial
        weights, then, round after round, the step along the example-weighted mean of every
        client's defended update (each computed by `client_update`, as its ClientApp would).
        Needs every client in every round (--fraction 1: Flower samples the others at random);
        defenses that act in Flower's protocol (flower-dp, secagg) are not replayed here."""
        if round_ > 1 and self.protocol.sampled_clients != self.cfg.clients:
            raise ConfigError(f"the global model after round 1 is re-derived from every client's update; "
                              f"--fraction {self.cfg.fraction} samples clients at random (use --fraction 1)")
        weights = {n: p.detach().cpu() for n, p in self.task.trainable().items()}
        for done in range(1, round_):
            if done not in self._trajectory:
                updates = [self.client_update(done, c, weights) for c in range(self.cfg.clients)]
                self._trajectory[done] = self.protocol.next_weights(weights, weighted_mean(updates))
            weights = self._trajectory[done]
        return weights

    # -- what the server sees --------------------------------------------------------------------
    def observe(self, round_: int = 1, client: int = 0,
                params: dict[str, torch.Tensor] | None = None) -> tuple[Observation, Truth]:
        """A client's update for a round at `params` (default: the initial global model) as the
        server's Observation, and the truth behind it, kept apart."""
        truth = self.truth(round_, (client,))
        return self.observe_examples(truth.images, truth.labels, params, round_, client), truth

    def observe_examples(self, images: torch.Tensor, labels: torch.Tensor,
                         params: dict[str, torch.Tensor] | None = None, round_: int = 1,
                         client: int = 0) -> Observation:
        """The Observation of the update a client holding these examples would send: any batch,
        not only the seeded one (experiments choose their own), through the same client code."""
        params = params if params is not None else {n: p.detach().cpu() for n, p in self.task.trainable().items()}
        update, n = self.client_update(round_, client, params, (images, labels))
        return observation(self.protocol, round_, client, update, params, n, self.spec)

    def scorer(self) -> "Scorer":
        return Scorer(self.task, self.knowledge.public.images[:GALLERY_SIZE], self.knowledge.class_names)


class Scorer:
    """A Reconstruction against the truth: Hungarian-matched image metrics, identifiability
    against a public gallery and, when the attack recovered embeddings (MIP), their similarity
    to the true ones."""

    def __init__(self, task, gallery: torch.Tensor, class_names):
        self.task, self.gallery, self.class_names = task, gallery, class_names
        self._centre: tuple[int, torch.Tensor] | None = None  # (round, gallery's mean embedding)

    def gallery_centre(self, round_: int, params) -> torch.Tensor:
        """The gallery's mean embedding under a round's global parameters, once per round."""
        if self._centre is None or self._centre[0] != round_:
            self._centre = (round_, mean_embedding(self.task, params, self.gallery))
        return self._centre[1]

    def score(self, obs: Observation, recon, truth: Truth) -> tuple[dict[str, Any], Any]:
        """(metrics, order): `recon.images[order]` lines up with `truth.images`."""
        metrics, order = evaluate(recon.images, recon.labels, truth.images, truth.labels, self.gallery)
        if "embeddings" in recon.extras:
            params = {n: t.to(self.task.device) for n, t in obs.global_params.items()}
            metrics.update(embedding_similarity(self.task, params, recon.extras["embeddings"][order],
                                                truth.images, self.gallery_centre(obs.round, params)))
        return metrics, order

    def row(self, obs: Observation, recon, truth: Truth) -> dict[str, Any]:
        """The results row of one attacked observation (without the run's own columns)."""
        metrics, _ = self.score(obs, recon, truth)
        return {"round": obs.round, "client": obs.client, "batch_size": obs.batch_size,
                **self.result(metrics, recon)}

    @staticmethod
    def result(metrics: dict[str, Any], recon) -> dict[str, Any]:
        """A successful attack's results columns: its metrics and what the attack reports."""
        return {**metrics, **{key: recon.extras.get(key) for key in ("gradient_loss", "prior", "update_numbers",
                                                                      "unknowns")}, "status": "ok"}


def aggregate(observations: list[Observation]) -> Observation:
    """What secure aggregation leaves the server: the example-weighted average of the updates,
    as one observation of all the clients' examples together (client -1; `clients` names them).
    Formed from plain observations, offline; a run under
    `--defense secagg` gets it from Flower's SecAgg+ (fedsim.secagg)."""
    first, total = observations[0], sum(o.batch_size for o in observations)
    update = weighted_mean([(o.update, o.batch_size) for o in observations])
    return Observation(round=first.round, client=-1, kind=first.kind, update=update,
                       global_params=first.global_params, batch_size=total, lr=first.lr,
                       local_steps=first.local_steps, model_spec=first.model_spec,
                       clients=tuple(o.client for o in observations))
