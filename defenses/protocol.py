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
    """What secure aggregation (Bonawitz et al., CCS 2017, arXiv 1611.04482; SecAgg+, Bell et al.,
    CCS 2020) lets the server learn: the sum of the sampled clients' updates, not any one of them.

    Not Flower's SecAgg+: Flower 1.41 offers it only as `SecAggPlusWorkflow` for the legacy
    `LegacyContext`/`flwr.server.strategy` API (configure_fit/aggregate_fit), and its
    `secaggplus_mod` speaks that API's messages; fedsim's server is a Message-API strategy
    (`flwr.serverapp.strategy.FedAvg`), with which they do not run. This defense simulates the
    outcome instead, with no cryptography: the curious server copies only the weighted average
    of the round's replies (what it could decode from the masked sum) and attacks that, as one
    observation of all the sampled clients' examples together (client -1 in the results).
    """

    name = "secagg"
    aggregate_only = True
