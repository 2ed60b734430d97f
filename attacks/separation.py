"""Separating a batch on MIP's image-head route: the B image-tower outputs and their labels, repeated
labels included, from the gradient of a head whose weights act on one example at a time.

Every such weight W (CLIP-Adapter's two layers, a linear probe) has a per-example gradient that is
an outer product, u_i v_i^T (fc1: the back-propagated error times the tower output f_i; fc2: the
error at the second layer times the hidden activation), so the batch gradient (1/B) sum_i u_i v_i^T
has rank B, and every example's u_i lies in its column space and v_i in its row space. The server
knows the global weights, so for a candidate (f, y) it computes the exact per-example gradient and
measures how far it falls outside those spaces, over all such weights at once:

    s(f, y) = sum_W ||G_W(f, y) - P_col G_W(f, y) P_row|| / ||G_W(f, y)||

s vanishes at every true (f_i, y_i) (to the float32 rounding of the update, ~1e-6) and, on CLIP-
Adapter at batch 8, nowhere else: the tests are 64 - 8 equations on the error at the second layer
alone against B - 1 unknowns (f in the first layer's row space, up to scale, which the head
ignores). The first layer's rank-B constraint alone (the hidden activations in the second layer's
row space) does not pin f down: examples that share a ReLU pattern mix freely under it.

The search (`separate`): Levenberg-Marquardt on s over f in the first layer's row space, for every
label, from public tower outputs projected onto that space (both signs), all candidates at once.
Every candidate that reaches `tol` is an example; its exact gradient is subtracted from the
update (deflation), which lowers the rank of what is left, and the search repeats on the rest
until B are found or a round finds none. At rank one the rest is read off directly, as at batch 1.
Two identical images (one direction found, twice its share of the gradient) count once.

Related work: the rank-B structure of a linear layer's batch gradient and its use for separating
examples appear in R-GAP (Zhu & Blaschko, ICLR 2021, arXiv 2010.07733) and in Kariyappa et al.'s
cocktail-party attack (ICML 2023, arXiv 2209.05578, which unmixes the row space by ICA); the
per-example span test over two layers, the search with deflation and the labels that come with
it are ours. Where the tests are too few (a linear probe with B close to its C classes), what is
not found is left to `attacks.embeddings`' gradient-matching fit.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import grad, jacfwd, vmap

from fedsim.task import Params, Task

CHUNK_FLOATS = 2**25  # float32 entries of the candidates' Jacobians held at once (128 MiB)


def row_and_column_spaces(target: Params, names: list[str], rank: int):
    """(U [m, rank], Vh [rank, n]) of each named 2-D gradient that the rank constrains, and the
    largest ratio of its first discarded singular value to its last kept one: how much rounding
    (float32, and the examples already subtracted) blurs those spaces."""
    spaces, blur = {}, 0.0
    for name in names:
        G = target[name]
        if G.dim() == 2 and rank < min(G.shape):
            U, S, Vh = torch.linalg.svd(G, full_matrices=False)
            spaces[name] = (U[:, :rank], Vh[:rank])
            blur = max(blur, float(S[rank] / S[rank - 1].clamp_min(1e-30)))
    return spaces, blur


class SpanTest:
    """s(f, y) and its residual vector for candidates f = c V (c in the first layer's row space)."""

    def __init__(self, task: Task, params: Params, spaces, feature_weight: str):
        self.params, self.spaces = params, spaces
        self.basis = spaces[feature_weight][1]  # V [rank, D]
        self.per_example = grad(task.head_loss)

    def residual(self, c: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        G = self.per_example(self.params, (c @ self.basis)[None], y[None])
        parts = []
        for name, (U, Vh) in self.spaces.items():
            g = G[name]
            parts.append(((g - U @ (U.T @ g @ Vh.T) @ Vh) / g.norm()).reshape(-1))
        return torch.cat(parts)

    def fit(self, c: torch.Tensor, y: torch.Tensor, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Levenberg-Marquardt on unit c [N, rank] with labels y [N]; returns (c, ||residual||)."""
        residual = vmap(self.residual)
        jacobian = vmap(jacfwd(self.residual))
        r = residual(c, y)
        if c.shape[1] == 1 or steps == 0:  # rank one: c = +-1, nothing to fit
            return c, r.norm(dim=1)
        lam = torch.full((len(c),), 1e-2)
        eye = torch.eye(c.shape[1])
        for _ in range(steps):
            J = jacobian(c, y)  # [N, R, rank]
            A = J.transpose(1, 2) @ J
            damping = (lam * A.diagonal(dim1=1, dim2=2).mean(-1))[:, None, None] * eye
            factor, failed = torch.linalg.cholesky_ex(A + damping)
            factor[failed != 0] = eye
            step = torch.cholesky_solve(-(J.transpose(1, 2) @ r[..., None]), factor).squeeze(-1)
            candidate = F.normalize(c + step, dim=-1)
            r_new = residual(candidate, y)
            better = (failed == 0) & (r_new.norm(dim=1) < r.norm(dim=1))
            c = torch.where(better[:, None], candidate, c)
            r = torch.where(better[:, None], r_new, r)
            lam = torch.where(better, (lam / 3).clamp_min(1e-9), lam * 5)
        return c, r.norm(dim=1)


def separate(task: Task, params: Params, update: Params, batch: int, public_features: torch.Tensor,
             feature_weight: str, weights: tuple[str, ...], starts: int = 48, steps: int = 25, tol: float = 1e-4,
             patience: int = 2, generator: torch.Generator | None = None
             ) -> tuple[list[tuple[torch.Tensor, int]], Params, dict]:
    """The examples found, as (unit tower-output direction [D], label), the part of the update
    they do not explain (deflated), and diagnostics. `weights`: the trainable weights whose
    per-example gradient is an outer product (`feature_weight` first among them); `starts`
    public tower outputs are drawn per round, and up to `patience` rounds in a row may find
    nothing (each draws new starts, twice as many as the round before) before the search gives
    up. A candidate is an example when its span test is below `tol`, or below ten times the
    spaces' blur where the examples left are a small part of the update (the last, well-
    classified example of a batch can be 0.5 % of it, and the rounding of the others then blurs
    its spaces above 1e-4)."""
    C = task.num_classes
    params = {n: p.float() for n, p in params.items()}
    target = {n: u.float().clone() for n, u in update.items()}
    found: list[tuple[torch.Tensor, int]] = []
    rounds, idle = 0, 0
    while len(found) < batch and idle <= patience:
        rank = batch - len(found)
        spaces, blur = row_and_column_spaces(target, list(weights), rank)
        if feature_weight not in spaces:
            break  # the batch fills the first layer: no row space to search in
        accept = max(tol, 10 * blur)
        rounds += 1
        test = SpanTest(task, params, spaces, feature_weight)
        pick = torch.randperm(len(public_features), generator=generator)[:starts * 2 ** idle]  # more after a miss
        c0 = F.normalize(public_features[pick].float() @ test.basis.T, dim=-1)
        c0 = torch.cat([c0, -c0]) if rank > 1 else torch.tensor([[1.0], [-1.0]])
        c0, labels = c0.repeat_interleave(C, 0), torch.arange(C).repeat(len(c0))
        per_chunk = max(1, CHUNK_FLOATS // (rank * sum(target[n].numel() for n in spaces)))
        fitted = [test.fit(c, y, steps) for c, y in zip(c0.split(per_chunk), labels.split(per_chunk))]
        c = torch.cat([f[0] for f in fitted])
        score = torch.cat([f[1] for f in fitted])
        directions = F.normalize(c @ test.basis, dim=-1)
        new = 0
        for i in score.argsort().tolist():
            if score[i] > accept or len(found) == batch:
                break
            if any(float(directions[i] @ f) > 0.9999 for f, _ in found):
                continue
            found.append((directions[i].detach(), int(labels[i])))
            G = test.per_example(params, directions[i][None], labels[i][None])
            target = {n: t - G[n].detach() / batch if n in G else t for n, t in target.items()}
            new += 1
        idle = 0 if new else idle + 1
    left = sum(float(t.pow(2).sum()) for t in target.values()) ** 0.5
    total = sum(float(u.float().pow(2).sum()) for u in update.values()) ** 0.5
    return found, target, {"separated": len(found), "separation_rounds": rounds,
                           "unexplained": left / max(total, 1e-30)}
