"""Privacy accounting for the DP defenses: what a run's protocol means for Opacus' RDP accountant.

fedsim only translates the protocol into the accountant's terms (noise multiplier, sampling
rate, number of steps); the accounting itself is Opacus' (`opacus.accountants.RDPAccountant`).

Assumptions, stated once:
- Example-level DP (`dp`, DP-SGD): each round a client draws a batch of B of its n examples;
  we account it as Poisson sampling at rate q = B/n, the approximation DP-SGD practice (and
  Opacus' own data loaders without Poisson sampling) makes for fixed-size random batches.
  The client with the fewest examples has the largest q, so its epsilon (the largest) is reported.
- FedSGD and FedAvg with `--local-steps k`: the k steps of a round all use the round's one
  batch, so the batch is sampled once and k Gaussian mechanisms of multiplier sigma run on it.
  In RDP their composition is exactly one Gaussian mechanism of multiplier sigma/sqrt(k), and
  the round is one subsampled step at rate q with that multiplier.
- FedAvg with `--local-epochs E`: E passes over shuffled batches, accounted as E*ceil(n/B) steps
  at rate q = B/n (shuffling, not Poisson: the same approximation as above).
- Client-level DP (`dp-update`, `flower-dp`): the unit protected is a client's whole data; it
  contributes one clipped update per round it takes part in. We count every round (no
  amplification by client sampling), an upper bound when `--fraction` < 1.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

from opacus.accountants import RDPAccountant

from fedsim.protocol import Protocol


@dataclass(frozen=True)
class Accounting:
    """A run's protocol in the accountant's terms, after `rounds` rounds. Defenses ask it for
    epsilon at their own delta (`Defense.privacy`)."""

    rounds: int
    sample_rate: float  # B / n of the smallest client (capped at 1)
    steps_per_round: int  # local SGD steps a client takes in a round
    same_batch: bool  # every step of a round uses the round's one batch

    @classmethod
    def of(cls, protocol: Protocol, client_sizes, rounds: int) -> "Accounting":
        n = min(client_sizes)
        return cls(rounds=rounds, sample_rate=min(1.0, protocol.batch_size / n),
                   steps_per_round=protocol.steps_behind(n), same_batch=not protocol.uses_epochs)

    def example_epsilon(self, noise: float, delta: float) -> float:
        """Example-level epsilon of DP-SGD with noise multiplier `noise` (see the module docstring)."""
        if self.same_batch:
            return epsilon(noise / math.sqrt(self.steps_per_round), self.sample_rate, self.rounds, delta)
        return epsilon(noise, self.sample_rate, self.rounds * self.steps_per_round, delta)

    def client_epsilon(self, noise: float, delta: float) -> float:
        """Client-level epsilon of one clipped, noised update per round."""
        return epsilon(noise, 1.0, self.rounds, delta)


def epsilon(noise: float, sample_rate: float, steps: int, delta: float) -> float:
    """Opacus' RDP epsilon at `delta` after `steps` subsampled Gaussian steps; inf without noise."""
    if steps == 0:
        return 0.0
    if noise <= 0:
        return math.inf
    accountant = RDPAccountant()
    accountant.history = [(noise, sample_rate, steps)]
    with warnings.catch_warnings():
        # At very small or very large noise the best RDP order lies at the end of Opacus' default
        # range and it warns; the epsilon is still a valid (looser) upper bound.
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(accountant.get_epsilon(delta))
