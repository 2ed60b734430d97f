"""Defenses that live in Flower's protocol rather than in the client's computation."""

from __future__ import annotations

from defenses.base import Defense


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
    model. Epsilon (client-level, see defenses.accounting) is
    the protection of the global model against anyone who sees it, not against the server.
    """

    name = "flower-dp"
    replies_with_weights = True

    def __init__(self, clip: float = 1.0, noise: float = 1.0, sampled_clients: int = 1):
        if clip <= 0 or noise < 0:
            raise ValueError(f"flower-dp needs clip > 0 and noise >= 0, got clip={clip}, noise={noise}")
        self.clip, self.noise, self.sampled_clients = clip, noise, sampled_clients

    @classmethod
    def from_config(cls, cfg) -> "FlowerDP":
        from fedsim.flower import clients_per_round

        return cls(clip=cfg.update_clip, noise=cfg.update_noise, sampled_clients=clients_per_round(cfg))

    def client_mods(self) -> list:
        from flwr.clientapp.mod import fixedclipping_mod

        return [fixedclipping_mod]

    def wrap_strategy(self, strategy):
        from flwr.serverapp.strategy import DifferentialPrivacyClientSideFixedClipping

        return DifferentialPrivacyClientSideFixedClipping(strategy, noise_multiplier=self.noise,
                                                          clipping_norm=self.clip,
                                                          num_sampled_clients=self.sampled_clients)

    def privacy(self, accounting) -> dict[str, float]:
        return {"epsilon_client": accounting.client_epsilon(self.noise)}


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
    aggregate_only = True

    def __init__(self, shares: int = 3, threshold: int = 2, clip: float = 8.0):
        self.shares, self.threshold, self.clip = shares, threshold, clip
        self.workflow(max_weight=1)  # Flower's own checks of the parameters, before any work

    @classmethod
    def from_config(cls, cfg) -> "SecureAggregation":
        return cls(shares=cfg.secagg_shares, threshold=cfg.secagg_threshold, clip=cfg.secagg_clip)

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

    def fit_workflow(self, cfg):
        from fedsim.secagg import max_examples

        return self.workflow(max_examples(cfg))
