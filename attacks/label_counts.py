"""How many examples of each class a text-side PEFT update holds, before any embedding is fitted:
the label-count step that lets MIP's label search at batch B look at a few label multisets instead
of all of them (`attacks.embeddings.text_side`).

The server can simulate clients: a batch's gradient is the mean of its examples' atoms
(`attacks.embeddings.per_example_atoms`, exact for FedSGD), so gradients of batches drawn from its
labelled public split cost one gather each. A ridge regression from the (standardised) gradient to
the label counts, trained on `sims` such batches, estimates the counts of an observed update; the
multisets are ranked by the Mahalanobis distance of their counts to the estimate, under the
covariance of the regression's errors on the simulated batches.

Related work: iLRG (Ma et al., "Instance-wise Batch Label Restoration via Gradients in Federated
Learning", ICLR 2023, arXiv 2204.13303) restores a classifier's label counts by solving a linear
system in the last layer's gradient; CoOp's gradient has no such layer (the labels act through the
class text features, seen only through J^T, a 256 x 640 map on the tiny CLIP), so the linear map is
learned from simulated public batches instead. That, and the ranking, are ours.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

ENUMERATE_UP_TO = 200_000  # multisets ranked exhaustively; beyond, the neighbours of the estimate


class CountEstimator:
    """Label counts of a batch of `batch` examples from its gradient, learned on public batches."""

    def __init__(self, atoms: torch.Tensor, labels: torch.Tensor, batch: int, classes: int | None = None,
                 sims: int = 20_000, ridge: float = 0.1, generator: torch.Generator | None = None):
        """`atoms` [N, P]: each public example's gradient under its own label; `labels` [N] of
        `classes` classes (default: the largest label + 1)."""
        gen = generator or torch.Generator().manual_seed(0)
        self.classes = classes or int(labels.max()) + 1
        self.batch = batch
        N = len(atoms)
        picks = torch.rand(sims, N, generator=gen).argsort(dim=1)[:, :batch] if N < 4096 else \
            torch.randint(N, (sims, batch), generator=gen)
        X = torch.cat([atoms[chunk].mean(1).double() for chunk in picks.split(1024)])
        Y = F.one_hot(labels[picks], self.classes).double().sum(1)
        self.mean, self.std = X.mean(0), X.std(0) + 1e-30
        X = (X - self.mean) / self.std
        self.offset = Y.mean(0)
        eye = torch.eye(X.shape[1], dtype=X.dtype)
        self.weight = torch.linalg.solve(X.T @ X + ridge * len(X) * eye, X.T @ (Y - self.offset))
        errors = X @ self.weight + self.offset - Y
        self.precision = torch.linalg.inv(torch.cov(errors.T) + 1e-6 * torch.eye(self.classes, dtype=X.dtype))

    def estimate(self, g: torch.Tensor) -> torch.Tensor:
        """Expected counts per class [C] (real numbers)."""
        return ((g.double() - self.mean) / self.std) @ self.weight + self.offset

    def distance(self, g: torch.Tensor, label_sets: torch.Tensor) -> torch.Tensor:
        """Mahalanobis distance [S] of each label set's counts to the estimate."""
        d = F.one_hot(label_sets, self.classes).double().sum(1) - self.estimate(g)
        return torch.einsum("sc,ce,se->s", d, self.precision, d)

    def ranked(self, g: torch.Tensor, k: int) -> torch.Tensor:
        """The `k` label multisets [k, B] (sorted labels) closest to the estimate: all of them
        ranked when there are at most ENUMERATE_UP_TO, else the rounded estimate and every
        multiset one or two label changes from it."""
        C, B = self.classes, self.batch
        if math.comb(C + B - 1, B) <= ENUMERATE_UP_TO:
            sets = torch.tensor(list(itertools.combinations_with_replacement(range(C), B)), dtype=torch.long)
        else:
            sets = neighbours(rounded(self.estimate(g), B), C, changes=2)
        order = self.distance(g, sets).argsort()[:k]
        return sets[order]


def rounded(counts: torch.Tensor, batch: int) -> torch.Tensor:
    """Non-negative integer counts summing to `batch` (largest remainders), as a sorted label set."""
    c = counts.clamp_min(0)
    c = c * (batch / c.sum()) if c.sum() > 0 else torch.full_like(c, batch / len(c))
    whole = c.floor()
    extra = int(batch - whole.sum())
    if extra > 0:
        whole[(c - whole).argsort(descending=True)[:extra]] += 1
    return torch.repeat_interleave(torch.arange(len(c)), whole.long())


def neighbours(labels: torch.Tensor, classes: int, changes: int) -> torch.Tensor:
    """Every sorted multiset reachable from `labels` by at most `changes` label replacements."""
    found = {tuple(sorted(labels.tolist()))}
    frontier = set(found)
    for _ in range(changes):
        nxt = set()
        for current in frontier:
            for i, c in itertools.product(range(len(current)), range(classes)):
                if c != current[i]:
                    nxt.add(tuple(sorted(current[:i] + (c,) + current[i + 1:])))
        found |= nxt
        frontier = nxt
    return torch.tensor(sorted(found), dtype=torch.long)
