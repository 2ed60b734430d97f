"""Flower-native defenses: Flower's own DP wrapper and mods, and Flower's SecAgg+. They live in
Flower's protocol rather than in the client's computation."""

from __future__ import annotations

from defenses.dp import DELTA
from defenses.update import UPDATE_CLIP, UPDATE_NOISE
from fedsim.api import ConfigError, Defense, Protocol
from fedsim.options import Option, above


class FlowerDP(Defense):
    """Flower's own central DP with client-side fixed clipping: the ClientApp runs Flower's
    `fixedclipping_mod`, which clips each client's update to norm C, and the server strategy is
    wrapped in Flower's `DifferentialPrivacyClientSideFixedClipping`, which adds Gaussian noise
    of std sigma*C / (sampled clients) to the average (the DP-FedAvg mechanism of McMahan,
    Ramage, Talwar, Zhang, ICLR 2018, arXiv 1710.06963).

    Flower's mod clips (reply - sent weights), so with this defense a client replies with weights,
    global + its step (FedAvg: the weight delta; FedSGD: -lr * gradient), and the server turns
    them back into updates; under FedSGD, C therefore bounds the step lr * gradient. The noise
    is added after the curious server has copied the replies, so this defense does not hide an
    update from the server itself: it bounds each update's norm and protects the released global
    model. Epsilon (client-level, see fedsim.accounting) is
    the protection of the global model against anyone who sees it, not against the server.
    """

    name = "flower-dp"
    options = (UPDATE_CLIP, UPDATE_NOISE, DELTA)
    replies_with_weights = True

    def __init__(self, clip: float = 1.0, noise: float = 1.0, delta: float = 1e-5, sampled_clients: int = 1):
        if not clip > 0 or not noise >= 0:
            raise ValueError(f"flower-dp needs clip > 0 and noise >= 0, got clip={clip}, noise={noise}")
        self.clip, self.noise, self.delta, self.sampled_clients = clip, noise, delta, sampled_clients

    @classmethod
    def from_options(cls, options, protocol: Protocol) -> "FlowerDP":
        return cls(**options, sampled_clients=protocol.sampled_clients)

    def client_mods(self) -> list:
        from flwr.clientapp.mod import fixedclipping_mod

        return [fixedclipping_mod]

    def wrap_strategy(self, strategy):
        from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

        return DifferentialPrivacyClientSideFixedClipping(strategy, noise_multiplier=self.noise,
                                                          clipping_norm=self.clip,
                                                          num_sampled_clients=self.sampled_clients)

    def privacy(self, accounting) -> dict[str, float]:
        return {"epsilon_client": accounting.client_epsilon(self.noise, self.delta), "delta": self.delta}


class SecureAggregation(Defense):
    """Flower's SecAgg+ (Bell, Bonawitz, Gascon, Lepoint, Raykova, CCS 2020, which builds on
    Bonawitz et al., CCS 2017, arXiv 1611.04482): the server learns the example-weighted average
    of the sampled clients' updates and no single one of them.

    The ClientApp runs Flower's `secaggplus_mod` and the server Flower's
    `SecAggPlusWorkflow(num_shares=--secagg-shares, reconstruction_threshold=--secagg-threshold)`
    inside `DefaultWorkflow`; both are real (key agreement, Shamir shares of the mask seeds,
    pairwise and private masks, unmasking). Flower runs SecAgg+ only on its legacy strategy API,
    so under this defense fedsim's curious server is `fedsim.secagg.CuriousLegacyFedAvg`, which
    copies the unmasked aggregate in `aggregate_fit` and attacks it as one observation of all the
    sampled clients' examples together (client -1 in the results, `clients` naming them).

    SecAgg+ works on integers: each client scales its update by examples / max_weight (fedsim sets
    max_weight to the most examples behind one update: the batch size, or the largest client
    under `--local-epochs`), clips every entry to [-`--secagg-clip`, `--secagg-clip`] and
    rounds it stochastically to one of 2^22 levels over that range. The aggregate is therefore the
    weighted mean up to a rounding error of at most 2 * clip / 2^22 per entry and client
    (3.8e-6 at the default clip of 8), and any update entry beyond +-clip (times max_weight /
    examples) is clipped. Needs at least two clients per round; runs with `fedsim run` (either
    engine), not under `flwr run` (a ClientApp's mods are fixed when it is built).
    """

    name = "secagg"
    options = (Option("shares", 3, "SecAgg+ neighbours each client secret-shares its keys with (>= 3; 1 = every "
                      "sampled client, as in the original SecAgg)", check=lambda s: s == 1 or s >= 3,
                      valid="1 (every sampled client) or >= 3"),
               Option("threshold", 2, "shares needed to rebuild a client's secret (2 <= threshold < shares; "
                      "1 = all of them)", check=lambda t: t >= 1, valid=">= 1"),
               Option("clip", 8.0, "SecAgg+ clips each update entry to [-clip, clip] before quantising it to "
                      "2^22 levels", **above(0)))

    def __init__(self, shares: int = 3, threshold: int = 2, clip: float = 8.0):
        self.shares, self.threshold, self.clip = shares, threshold, clip
        self.workflow(max_weight=1)  # Flower's own checks of the parameters, before any work

    def check_chain(self, chain: list[str], protocol: Protocol) -> None:
        """SecAgg+'s own constraints (Flower's SecAggPlusWorkflow), checked before any work."""
        if "flower-dp" in chain:
            raise ConfigError("--defense secagg cannot be chained with flower-dp: Flower's SecAgg+ runs on its "
                              "legacy strategy API, its fixed-clipping DP wrapper here on the Message API")
        sampled = protocol.sampled_clients
        if sampled < 2:
            raise ConfigError(f"--defense secagg needs at least 2 clients per round (--clients x --fraction), "
                              f"got {sampled}")
        if self.shares > max(3, sampled):  # Flower's set-up loops over the shares: a huge number never ends
            raise ConfigError(f"--secagg-shares {self.shares} is more than the {sampled} clients per round; "
                              f"valid: 1 (every sampled client) or 3..{max(3, sampled)}")
        neighbours = sampled if self.shares == 1 else min(self.shares, sampled)
        if not (self.threshold == 1 or 2 <= self.threshold <= neighbours) or (
                self.shares >= 3 and self.threshold >= self.shares):
            raise ConfigError(f"--secagg-threshold must be 1 (all shares) or in 2..{neighbours} and below "
                              f"--secagg-shares {self.shares}, got {self.threshold}")

    def client_mods(self) -> list:
        from flwr.client.mod import secaggplus_mod

        return [secaggplus_mod]

    def workflow(self, max_weight: int):
        """Flower's SecAgg+ fit workflow with this defense's parameters."""
        from flwr.server.workflow import SecAggPlusWorkflow

        try:
            return SecAggPlusWorkflow(self.shares, self.threshold, max_weight=float(max_weight),
                                      clipping_range=float(self.clip))
        except ValueError as exc:
            raise ValueError(f"secagg: --secagg-shares {self.shares}, --secagg-threshold {self.threshold}, "
                             f"--secagg-clip {self.clip}: {exc} (valid: shares 1 = every sampled client "
                             "or >= 3; threshold 1 = all shares or 2 <= threshold < shares; clip > 0)") from exc

    def fit_workflow(self, max_examples: int):
        return self.workflow(max_examples)

