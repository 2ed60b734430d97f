"""MIP's inverse gradient estimation: from a CLIP PEFT gradient back to the batch's labels and
image embeddings, without back-propagating through the text encoder in any loop.

Two routes, by where the trainable parameters sit (see `attacks.mip` for the paper):

Text side (CoOp prompts, text adapter, LoRA on the text tower). The image enters the loss only
through its unit-norm embedding z_i, and the gradient of the class text features T [C, D] is

    G = dL/dT = (s / B) * sum_i e_i z_i^T,   e_i = softmax(s T z_i) - onehot(y_i),

so the observed gradient is g = J^T vec(G), with J = dT/dtheta the text side's Jacobian at the
global parameters: the same for every client of a round, computed once (`TextJacobian`).
J has fewer rows than G has entries for CoOp (256 against 640 on the tiny CLIP), so G cannot be
read back directly; the embeddings are fitted on the exact model instead, for candidate label
sets, and the set that fits best gives the labels:
- every (public embedding, label) pair is an "atom", the gradient one such example would
  induce (a batch's gradient is the mean of its examples' atoms); atoms give the candidates
  and starts at batch 1, and the starts of every candidate set at batch B (`text_side` says
  which sets are tried);
- when J^T is injective (a text adapter: 2,048 rows), G comes back by least squares, and its
  largest row -(1 - p_y) z gives the label and a start directly;
- each candidate's embeddings are refined by Levenberg-Marquardt, labels fixed, all candidates
  at once with a closed-form Jacobian: min_Z ||J^T vec(G(Z)) - g||^2; the lowest residual
  wins (`attacks.label_search`).

Image head (CLIP-Adapter's first layer, a linear probe). The weight W that multiplies the image
tower's output f_i has gradient sum_i a_i f_i^T: rank one at batch 1, so f comes back exactly
(up to sign and scale, which the head ignores: it has no biases before the normalisation, or
normalises first) from the top right singular vector; sign and label are chosen by the exact
head's gradient. At batch B, the f_i span the top-B right singular space; their coefficients
and soft labels are fitted by cosine gradient matching through the head alone (no towers).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch.func import grad, jvp, vjp, vmap

from attacks.label_counts import CountEstimator
from attacks.label_search import (
    HALVING,
    SHORTLIST_HALVING,
    aligned_starts,
    candidate_label_sets,
    count_label_sets,
    matched_starts,
    successive_halving,
)
from attacks.objectives import cosine_distance
from attacks.separation import separate
from fedsim.task import Params, Task, precision, second_order_attention, unflatten


class TextJacobian:
    """J = d vec(T) / d theta for the trainable parameters that reach the class text features,
    at given global parameters, as a [C, D, P] tensor, plus what is needed to use it."""

    def __init__(self, task: Task, params: Params, names: list[str], chunk: int = 64):
        self.names = names
        flat = torch.cat([params[n].reshape(-1) for n in names]).detach().double()
        shapes = [params[n].shape for n in names]
        rest = {n: p.detach().double() for n, p in params.items() if n not in names}
        with precision(task.model, torch.float64):
            def text_of(v: torch.Tensor) -> torch.Tensor:
                return task.text_features({**rest, **unflatten(v, names, shapes)})

            self.text = text_of(flat).detach()  # [C, D]
            C, D = self.text.shape
            with second_order_attention():
                self.matrix = _jacobian(text_of, flat, C * D, chunk).view(C, D, -1)  # [C, D, P]

    def apply(self, G: torch.Tensor) -> torch.Tensor:
        """J^T vec(G): the parameter gradient that a text-feature gradient G [C, D] induces."""
        return torch.einsum("cd,cdp->p", G, self.matrix)


def _jacobian(fn, x: torch.Tensor, outputs: int, chunk: int) -> torch.Tensor:
    """d fn / d x [outputs, inputs], forward mode when there are fewer inputs than outputs,
    reverse mode otherwise, `chunk` basis vectors at a time (memory: the tangents of a whole
    ViT text tower for every basis vector at once would not fit)."""
    inputs = x.numel()
    basis = torch.eye(inputs if inputs <= outputs else outputs, dtype=x.dtype, device=x.device)
    if inputs <= outputs:
        column = vmap(lambda t: jvp(fn, (x,), (t,))[1].reshape(-1))
        return torch.cat([column(b) for b in basis.split(chunk)]).T
    _, pullback = vjp(lambda v: fn(v).reshape(-1), x)
    return torch.cat([vmap(lambda c: pullback(c)[0])(b) for b in basis.split(chunk)])


SINGLE_STEPS = 30  # LM steps for each batch-1 candidate: a batch of one is far from the edge of identifiability


def flat_update(update: Params, names: list[str]) -> torch.Tensor:
    return torch.cat([update[n].reshape(-1) for n in names]).double()


def per_example_atoms(jac: TextJacobian, scale: torch.Tensor, embeddings: torch.Tensor,
                      chunk: int = 256) -> torch.Tensor:
    """h(z, c) = J^T vec(dL/dT) for one example with embedding z and label c, for every given
    embedding [N, D] and every class: [N, C, P]. A batch's gradient is the mean of its atoms."""
    T = jac.text
    C = T.shape[0]
    out = []
    for Z in embeddings.double().split(chunk):
        probs = torch.softmax(scale * Z @ T.T, -1)  # [n, C]
        E = probs[:, None, :] - torch.eye(C, dtype=Z.dtype, device=Z.device)[None]  # [n, label, C]
        out.append(scale * torch.einsum("nlc,nd,cdp->nlp", E, Z, jac.matrix))
    return torch.cat(out)


def pursue(atoms: torch.Tensor, g: torch.Tensor, batch: int) -> list[tuple[int, int]]:
    """Greedy pursuit: `batch` (candidate, label) atoms whose non-negative combination best
    explains g; each step takes the atom most aligned with what is still unexplained."""
    N, C, P = atoms.shape
    flat = F.normalize(atoms.reshape(N * C, P), dim=1)
    chosen: list[int] = []
    residual = g
    for _ in range(batch):
        pick = int((flat @ residual).argmax())
        chosen.append(pick)
        A = atoms.reshape(N * C, P)[chosen].T  # [P, k]
        coef = torch.linalg.lstsq(A, g.unsqueeze(1)).solution.clamp_min(0)
        residual = g - (A @ coef).squeeze(1)
    return [divmod(i, C) for i in chosen]


def text_side(task: Task, params: Params, update: Params, batch: int, public_embeddings: torch.Tensor,
              jacobian: TextJacobian | None = None, public_labels: torch.Tensor | None = None,
              candidates: int = 8, good_enough: float = 1e-4, max_label_sets: int = 64,
              ranked_sets: int = 64, schedule=HALVING, progress=None, memo: dict | None = None):
    """(labels [B], unit-norm embeddings [B, D], diagnostics) from a text-side PEFT gradient.

    Candidate label sets are fitted on the exact model (`attacks.label_search`) and the lowest
    residual wins:
    - batch 1: the least-squares start where J^T is injective and, unless it fits to
      `good_enough`, the `candidates` (public embedding, label) atoms best aligned with g, each
      fitted `SINGLE_STEPS` LM steps;
    - batch B: the greedy pursuit's set, then by successive halving over `schedule`, if there
      are at most `max_label_sets` multisets, every set of B distinct labels and, separately,
      every multiset that repeats a label; beyond that, the `ranked_sets` multisets closest to
      the label-count step's estimate (`attacks.label_counts`, given `public_labels`), or its
      single closest where the update has no more numbers than the B embeddings have unknowns
      (B (D - 1)): there every set fits and the fit cannot choose (`memo`, kept by the caller for
      the round, holds the count step's regression). Each set starts twice: from the public
      embeddings whose single-image atoms, for its labels, align best with g, and from those
      whose atoms jointly explain g best (public images of the label's own class only, given
      `public_labels`)."""
    names = [n for n in update if n in params]
    jac = jacobian or TextJacobian(task, params, names)
    memo = {} if memo is None else memo  # what the caller keeps for the round (`MIP.round_state`)
    g = flat_update(update, names)
    scale = task.model.clip.logit_scale.exp().double()
    pub = public_embeddings.to(g.device, torch.float64)
    C, D = jac.text.shape
    tried = []  # (label sets [S, B], their relative residuals [S], their embeddings [S, B, D])
    info_counts = None  # the label-count step's estimate, where it ran

    def consider(label_sets: torch.Tensor, Z: torch.Tensor, plan) -> float:
        """Fit these candidates from these starts; the lowest residual so far."""
        residuals, fitted = successive_halving(jac, scale, g, label_sets, Z, plan, progress)
        tried.append((label_sets.cpu(), residuals, fitted))
        return min(float(r.min()) for _, r, _ in tried)

    def aligned(atoms: torch.Tensor) -> torch.Tensor:  # [N, C]: each atom's cosine with g
        return F.cosine_similarity(atoms, g.view(1, 1, -1), dim=-1)

    if batch == 1:
        single = ((SINGLE_STEPS, None),)
        fitted = math.inf
        if g.numel() >= C * D:
            # J^T is injective (e.g. a text adapter): G itself comes back by least squares, and
            # at batch 1 it is s e z^T, whose label row is -(1 - p) z.
            G = torch.linalg.lstsq(jac.matrix.reshape(C * D, -1).T, g.unsqueeze(1)).solution.view(C, D)
            label = int(G.norm(dim=1).argmax())
            fitted = consider(torch.tensor([[label]]), F.normalize(-G[label], dim=0).view(1, 1, D), single)
        if fitted >= good_enough:  # not an exact fit yet: the best-aligned atoms
            scores = aligned(per_example_atoms(jac, scale, pub))
            top = scores.flatten().topk(min(candidates, scores.numel())).indices
            consider((top % C)[:, None], pub[top // C][:, None], single)
    else:
        atoms = per_example_atoms(jac, scale, pub)  # [N, C, P]
        scores = aligned(atoms)
        picks = pursue(atoms, g, batch)
        pursuit = torch.tensor([[c for _, c in picks]]), pub[[n for n, _ in picks]][None]  # (labels, starts)
        if g.numel() > batch * (D - 1):  # where the fit can tell label sets apart
            consider(*pursuit, schedule)
        allowed = torch.ones_like(scores, dtype=torch.bool)
        if public_labels is not None:  # a label's starts come from its own public images
            allowed = public_labels.to(scores.device)[:, None] == torch.arange(C, device=scores.device)
        ranked = [scores[:, c].masked_fill(~allowed[:, c], -2.0).argsort(descending=True)[:batch] for c in range(C)]
        pools = []
        if count_label_sets(C, batch, distinct=False) <= max_label_sets:
            # Two pools, each halved on its own: a distinct-label set that converges late is not cut
            # for the sake of the many multisets (a repeat of one of its labels often fits early).
            pools.append(candidate_label_sets(C, batch, distinct=True))
            every = candidate_label_sets(C, batch, distinct=False)  # sorted: a repeat sits next to its twin
            pools.append(every[(every[:, 1:] == every[:, :-1]).any(1)])
        elif public_labels is not None:
            # Too many multisets to fit them all: the label-count step ranks them, and the fit
            # decides among the closest. Where the update holds fewer numbers than the embeddings
            # have unknowns, every set fits it; the counts alone decide (the closest set).
            if batch not in memo.setdefault("counts", {}):  # the same for every client of a round
                own = atoms[torch.arange(len(pub)), public_labels.to(atoms.device)]
                memo["counts"][batch] = CountEstimator(own, public_labels, batch, classes=C)
            counts = memo["counts"][batch]
            shortlist = counts.ranked(g, ranked_sets if g.numel() > batch * (D - 1) else 1)
            info_counts = [round(float(c), 2) for c in counts.estimate(g)]
            pools.append(shortlist)
        else:
            pools.append(candidate_label_sets(C, batch, distinct=True)[:max_label_sets])
        for sets in (p for p in pools if len(p)):
            first = aligned_starts(sets, ranked)
            matched = matched_starts(sets, atoms, g, allowed, first)
            consider(torch.cat([sets, sets]), pub[torch.cat([first, matched])],
                     SHORTLIST_HALVING if info_counts is not None else schedule)
        if not tried:  # nothing else to fit (no public labels, more examples than classes)
            consider(*pursuit, schedule)
    sets, residuals, Z = (torch.cat(parts) for parts in zip(*tried))
    best = int(residuals.argmin())
    as_sets = sets.sort(dim=1).values
    info = {"relative_residual": float(residuals[best]), "label_sets_tried": len(as_sets.unique(dim=0)),
            "fits": len(sets)}
    if info_counts is not None:
        info["label_counts"] = info_counts
    other = (as_sets != as_sets[best]).any(1)
    if other.any():  # how well the best other label set fits: the margin of the labels
        info["runner_up_residual"] = float(residuals[other].min())
    return sets[best], Z[best].float(), info


def head_side(task: Task, params: Params, update: Params, batch: int, weight_name: str,
              iterations: int = 300, restarts: int = 8, generator: torch.Generator | None = None,
              public_features: torch.Tensor | None = None):
    """(labels [B], image-tower feature directions [B, D], diagnostics) from the gradient of a
    weight that multiplies the tower's output (CLIP-Adapter's first layer, a linear probe).

    Batch 1: the top right singular vector, sign and label by the exact head's gradient. Batch B:
    the examples are separated by their per-example span test (`attacks.separation`, from
    `public_features`, the public images' tower outputs, as starts); what it leaves is fitted by
    gradient matching in the rest's row space (soft labels, `restarts` seeded starts)."""
    C = task.num_classes
    head = grad(task.head_loss)
    if batch == 1:
        _, S, Vh = torch.linalg.svd(update[weight_name].double(), full_matrices=False)
        candidates = []
        for sign, label in itertools.product((1.0, -1.0), range(C)):
            f = (sign * Vh[0]).float().view(1, -1)
            y = torch.tensor([label])
            candidates.append((float(cosine_distance(head(params, f, y), update)), sign, label))
        loss, sign, label = min(candidates)
        return (torch.tensor([label]), (sign * Vh[0]).float().view(1, -1),
                {"gradient_loss": loss, "rank_gap": float(S[1] / S[0]) if len(S) > 1 else 0.0})
    found, rest, info = [], update, {}
    weights = task.model.rank_one_weights
    if public_features is not None and weights:
        found, rest, info = separate(task, params, update, batch, public_features, weight_name, weights,
                                     generator=generator)
    labels = torch.tensor([y for _, y in found], dtype=torch.long)
    features = torch.stack([f for f, _ in found]) if found else torch.zeros(0, update[weight_name].shape[1])
    missing = batch - len(found)
    if missing:
        span = torch.linalg.svd(rest[weight_name].double(), full_matrices=False)[2][:missing].float()
        more_labels, more, fit_info = _fit_head_batch(task, params, rest, span, missing, iterations, restarts,
                                                      generator)
        labels, features = torch.cat([labels, more_labels]), torch.cat([features, more])
        info.update(fit_info)
    else:  # every example found: how well they explain the whole update
        info["gradient_loss"] = float(cosine_distance(head(params, features, labels), update))
    return labels, features, info


def _fit_head_batch(task, params, target, span, batch, iterations, restarts, generator):
    """Features in the observed span and soft labels, fitted by cosine gradient matching
    through the image head alone; the best of `restarts` seeded starts."""
    C = task.num_classes
    best = None
    for _ in range(restarts):
        coef = (torch.eye(batch) + 0.5 * torch.randn(batch, batch, generator=generator)).requires_grad_(True)
        logits = torch.randn(batch, C, generator=generator).requires_grad_(True)
        opt = torch.optim.Adam([coef, logits], lr=0.05)
        for _ in range(iterations):
            opt.zero_grad()
            loss = _head_match(task, params, target, coef @ span, torch.softmax(logits, -1))
            loss.backward()
            opt.step()
        with torch.no_grad():
            labels = logits.argmax(-1)
            f = coef @ span
            hard = float(_head_match(task, params, target, f, labels))
        if best is None or hard < best[0]:
            best = (hard, labels.detach(), f.detach())
    return best[1], best[2], {"gradient_loss": best[0]}


def _head_match(task, params, target, features, targets):
    """Cosine distance between the head's gradient for these features and the observed one;
    differentiable w.r.t. the features (torch.func.grad composes with autograd)."""
    return cosine_distance(grad(task.head_loss)(params, features, targets), target)
