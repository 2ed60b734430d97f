"""MIP's label-set search on the text side: which labels, and which embeddings, explain a
text-side PEFT gradient (the model and the notation are in `attacks.embeddings`).

For a candidate label set the embeddings are fitted on the exact model, min_Z ||J^T vec(G(Z)) - g||,
by Levenberg-Marquardt (`fit_label_sets`); the true set reaches the float32 rounding of the update
(relative residual ~1e-7) while a wrong set stalls orders of magnitude above it, so the best
fit gives the labels. At batch 4 on the tiny CLIP the fit is barely over-determined (252 unknowns
for 256 equations): a wrong set can come within 1e-5 and the true set, from a poor start, can
stall near 1e-3 (README, MIP). Two things make the search reliable there:
- two starts per set: the public embeddings whose single-image gradients align best with g,
  label by label, and those whose gradients jointly explain g best (`matched_starts`);
- successive halving (`successive_halving`): every candidate gets a few steps, the best get
  more, and only a handful are fitted to convergence, so convergence is affordable. Sets of
  distinct labels and sets that repeat a label are halved apart (`attacks.embeddings.text_side`).
This search is ours: the paper (Zhou et al. 2024, arXiv 2403.07901) predicts labels from the
PEFT gradient without saying how for a batch.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

CHUNK_FLOATS = 2**26  # float64 entries of the label sets' Jacobians held at once (512 MiB)
# (LM steps, candidates kept after them). At batch 4 with 10 classes (210 distinct-label sets,
# two starts each) the true set ranked at worst 25th of the 420 candidates after the first round
# in 20 probe batches (README, MIP); the later rounds fit a handful to convergence.
HALVING = ((10, 128), (20, 32), (40, 8), (100, None))
# The same for the label-count step's shortlist (`attacks.label_counts`): a few dozen sets, two
# starts each, already ranked; at batch 4 it keeps the labels and takes a fifth of the steps.
SHORTLIST_HALVING = ((10, 32), (30, 8), (100, None))


def induced_residual(jac, scale: torch.Tensor, g: torch.Tensor, onehot: torch.Tensor,
                     Z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """r = J^T vec(G) - g for S candidate batches at once: labels `onehot` [S, B, C], embeddings
    Z [S, B, D] (normalised here), G the text-feature gradient of CLIP's mean cross-entropy
    (`attacks.embeddings`), `jac` a `TextJacobian`. Also dr/dZ [S, P, B*D] in closed form, which
    costs a few contractions with J where forward-mode autodiff would push B*D tangents through them:
    with z = Z/|Z|, p = softmax(s T z), e = p - y and J_c = J[c] [D, P],
        dr/dz_i = (s/B) [ s (sum_c (z_i J_c) (H_i T)_c) + sum_c e_ic J_c ]^T,  H_i = diag(p_i) - p_i p_i^T,
    then through the normalisation, dz/dZ = (I - z z^T) / |Z|."""
    S, B, D = Z.shape
    T, M = jac.text, jac.matrix  # [C, D], [C, D, P]
    norm = Z.norm(dim=-1, keepdim=True)
    z = Z / norm
    p = torch.softmax(scale * z @ T.T, -1)  # [S, B, C]
    e = p - onehot
    r = scale / B * torch.einsum("sbc,sbd,cdp->sp", e, z, M) - g
    H = torch.diag_embed(p) - p[..., :, None] * p[..., None, :]  # [S, B, C, C]
    zM = torch.einsum("sbd,cdp->sbcp", z, M)
    dr = torch.einsum("sbcp,sbce->spbe", zM, scale * H @ T).contiguous()  # dr/dz [S, P, B, D]
    dr += torch.einsum("sbc,cdp->spbd", e, M)
    # through the normalisation: (dr/dz) (I - z z^T) / |Z|, without forming the D x D projector
    dr -= (dr * z[:, None]).sum(-1, keepdim=True) * z[:, None]
    dr *= (scale / B / norm)[:, None]
    return r, dr.view(S, -1, B * D)


def fit_label_sets(jac, scale: torch.Tensor, g: torch.Tensor, label_sets: torch.Tensor,
                   Z: torch.Tensor, steps: int = 30, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Levenberg-Marquardt on the exact model for every candidate label set at once, each with
    its own damping: unit-norm Z [S, B, D] minimising ||J^T vec(G(Z)) - g|| with the labels of
    `label_sets` [S, B] fixed, from the given starts. Returns each set's relative residual [S]
    and its embeddings. Sets are fitted in chunks that bound the memory of their Jacobians."""
    S, B, D = Z.shape
    C, P, device = jac.text.shape[0], g.numel(), jac.text.device
    label_sets, Z = label_sets.to(device), Z.to(device, torch.float64)
    chunk = max(1, CHUNK_FLOATS // (4 * P * B * D))
    residuals, fitted = [], []
    chunks = -(-S // chunk)
    for k, (labels, start) in enumerate(zip(label_sets.split(chunk), Z.split(chunk))):
        onehot = F.one_hot(labels, C).double()
        z = F.normalize(start, dim=-1)
        r, dr = induced_residual(jac, scale, g, onehot, z)
        lam = torch.full((len(z),), 1e-3, dtype=z.dtype, device=device)
        eye = torch.eye(B * D, dtype=z.dtype, device=device)
        for it in range(steps):
            if progress:
                progress(k * steps + it + 1, chunks * steps)
            active = (lam < 1e6) & (r.norm(dim=1) > 1e-9 * g.norm())  # not stalled, not fitted exactly
            if not active.any():
                break
            A = dr.transpose(1, 2) @ dr  # singular along each z (the fit ignores |z|): the damping
            damping = (lam * A.diagonal(dim1=1, dim2=2).mean(-1))[:, None, None] * eye
            factor, failed = torch.linalg.cholesky_ex(A + damping)
            solvable = failed == 0  # a set whose damped system is still singular counts as a rejected step
            factor[~solvable] = eye
            step = torch.cholesky_solve(-(dr.transpose(1, 2) @ r[..., None]), factor)
            candidate = F.normalize(z + step.view(z.shape), dim=-1)
            r_new, dr_new = induced_residual(jac, scale, g, onehot, candidate)
            better = active & solvable & (r_new.norm(dim=1) < r.norm(dim=1))
            z = torch.where(better[:, None, None], candidate, z)
            r = torch.where(better[:, None], r_new, r)
            dr = torch.where(better[:, None, None], dr_new, dr)
            lam = torch.where(better, (lam / 3).clamp_min(1e-12), lam * 5)
        residuals.append(r.norm(dim=1) / g.norm())
        fitted.append(z)
    return torch.cat(residuals), torch.cat(fitted)


def successive_halving(jac, scale: torch.Tensor, g: torch.Tensor, label_sets: torch.Tensor, Z: torch.Tensor,
                       schedule=HALVING, progress=None) -> tuple[torch.Tensor, torch.Tensor]:
    """`fit_label_sets` by rounds: each (steps, keep) of `schedule` fits the surviving candidates
    `steps` more LM steps, then keeps the `keep` lowest residuals (all of them for None).
    Returns every candidate's latest relative residual [S] and embeddings [S, B, D]; since LM
    never increases a residual, the survivors of the last round hold the lowest ones."""
    residuals = torch.full((len(label_sets),), math.inf, dtype=torch.float64)
    fitted = Z.detach().to(torch.float64).cpu().clone()
    alive = torch.arange(len(label_sets))
    sizes, n = [], len(alive)
    for steps, keep in schedule:
        sizes.append(n * steps)
        n = n if keep is None else min(n, keep)
    total, done = sum(sizes), 0
    for (steps, keep), work in zip(schedule, sizes):
        tick = None if progress is None else (
            lambda i, of, done=done, work=work: progress(done + work * i // of, total))
        r, z = fit_label_sets(jac, scale, g, label_sets[alive], fitted[alive], steps, tick)
        residuals[alive], fitted[alive] = r.cpu(), z.cpu()
        done += work
        if keep is not None:
            alive = alive[r.cpu().argsort()[:keep]]
    return residuals, fitted


def candidate_label_sets(classes: int, batch: int, distinct: bool) -> torch.Tensor:
    """Every set of `batch` distinct labels [S, B], or every multiset of `batch` labels."""
    pick = itertools.combinations if distinct else itertools.combinations_with_replacement
    return torch.tensor(list(pick(range(classes), batch)), dtype=torch.long).view(-1, batch)


def count_label_sets(classes: int, batch: int, distinct: bool) -> int:
    return math.comb(classes, batch) if distinct else math.comb(classes + batch - 1, batch)


def aligned_starts(label_sets: torch.Tensor, ranked: list[torch.Tensor]) -> torch.Tensor:
    """Public embeddings to start from, as indices [S, B]: the k-th occurrence of label c in a
    set starts from the k-th best public embedding for c (`ranked[c]`)."""
    picks = torch.empty_like(label_sets)
    for s, labels in enumerate(label_sets.tolist()):
        seen: dict[int, int] = {}
        for b, c in enumerate(labels):
            k = seen.get(c, 0)
            seen[c] = k + 1
            picks[s, b] = ranked[c][min(k, len(ranked[c]) - 1)]
    return picks


def matched_starts(label_sets: torch.Tensor, atoms: torch.Tensor, g: torch.Tensor, allowed: torch.Tensor,
                   first: torch.Tensor, sweeps: int = 3) -> torch.Tensor:
    """Public embeddings to start from, as indices [S, B], chosen jointly: a batch's gradient is
    the mean of its examples' atoms (`atoms` [N, C, P], see `per_example_atoms`), so the choice
    of one public embedding per slot that best explains g is a discrete least-squares problem,
    solved by coordinate descent from `first` [S, B]. Slot b of a set may use public embedding n
    only where `allowed` [N, C] says so for its label, and never one another slot with the same
    label holds (two identical starts with one label would stay identical under LM)."""
    S, B = label_sets.shape
    N = atoms.shape[0]
    by_class = atoms.transpose(0, 1)  # [C, N, P]
    squared = by_class.pow(2).sum(-1)  # [C, N]
    picks = first.clone()
    chosen = by_class[label_sets, picks]  # [S, B, P]
    rows = torch.arange(S)
    for _ in range(sweeps):
        for b in range(B):
            c = label_sets[:, b]
            rest = chosen.sum(1) - chosen[:, b] - B * g  # what the other slots leave unexplained, times B
            inner = torch.empty(S, N, dtype=atoms.dtype, device=atoms.device)
            for label in c.unique():
                here = c == label
                inner[here] = rest[here] @ by_class[label].T
            cost = 2 * inner + squared[c]  # ||rest + a_n||^2 - ||rest||^2
            cost = cost.masked_fill(~allowed.T[c], math.inf)
            for other in range(B):
                same = (label_sets[:, other] == c) & (other != b)
                cost[rows[same], picks[same, other]] = math.inf
            picks[:, b] = cost.argmin(1)
            chosen[:, b] = by_class[c, picks[:, b]]
    return picks
