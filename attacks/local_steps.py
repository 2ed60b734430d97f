"""FedAvg's local steps replayed on MIP's text route: embeddings that reproduce a weight delta.

A client that takes K plain-SGD steps on its batch sends delta = theta_K - theta_0. On the text
side (CoOp prompts, a text adapter, text LoRA) the steps move the class text features, so the
pseudo-gradient -delta / (lr K) is not the gradient at the global parameters: embeddings fitted to
it through the round's Jacobian (`attacks.embeddings.text_side`) come out wrong from K = 2 on
(the labels stay right). But the image tower is frozen, so each example's embedding is the same at
every step, and everything else is public: the global parameters, the learning rate, K and the
batch size. For candidate embeddings Z (labels fixed) the server replays the K steps exactly,
second-order through the text tower, and fits Z by Levenberg-Marquardt on ||delta(Z) - delta||:
- starts: the pseudo-gradient route's embeddings and every public embedding of the label,
  ranked by how well its own replay explains the delta (one cheap replay each), fitted in turn
  until one reaches the delta (a fit can stall in a local minimum; at most three starts);
- at the true embeddings the replay matches the delta to ~1e-6, so the residual says how well
  the fit went (`replay_residual` in the extras).

The replay is exact where every local step sees the whole batch; `replays` says when MIP uses it
(at batch 1, where that always holds). The idea that the server can simulate a client's local
training to invert a FedAvg update is Dimitrov et al.'s ("Data Leakage in Federated Averaging",
TMLR 2022, arXiv 2206.12395), who simulate it on images; replaying it on frozen-tower embeddings,
the starts and the fit are ours.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.func import grad, jacfwd

from fedsim.task import Params, Task, precision, second_order_attention, unflatten

ITERATIONS = 20  # LM steps from one start at most
STARTS = 3  # starts tried in turn, best first, until one fits to ACCEPT
TOLERANCE = 1e-6  # relative residual at which a fit stops: about the float32 rounding of a replay
ACCEPT = 1e-4  # relative residual of a fit taken as found (a local minimum stalls at 1e-3 or above)


def replays(kind: str, steps: int, batch: int) -> bool:
    """Whether MIP replays a client's local steps: a delta of more than one step on one example
    (every step then sees the whole batch, whatever the plan, so the replay is exact). Beyond
    batch 1 the pseudo-gradient's labels are often wrong already (batch 4, 5 steps: half of them)
    and the fit from its embeddings stalled (relative residual 0.2 after a minute per client): not
    worth its cost yet (README, MIP)."""
    return kind == "delta" and steps > 1 and batch == 1


class LocalSteps:
    """A text-side client's K plain-SGD steps on one batch, as a function of the batch's
    embeddings, in the embeddings' precision (the model must be in it too: `precision`)."""

    def __init__(self, task: Task, params: Params, names: list[str], lr: float, steps: int):
        self.task, self.names, self.lr, self.steps = task, names, lr, steps
        self.shapes = [params[n].shape for n in names]
        self.flat = torch.cat([params[n].reshape(-1) for n in names]).detach()
        self.rest = {n: p.detach() for n, p in params.items() if n not in names}

    def _loss(self, flat: torch.Tensor, Z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        rest = {n: p.to(Z.dtype) for n, p in self.rest.items()}
        text = self.task.text_features({**rest, **unflatten(flat, self.names, self.shapes)})
        return F.cross_entropy(self.task.model.logits_with(F.normalize(Z, dim=-1), text), labels)

    def delta(self, Z: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The flat delta [P] that embeddings Z [B, D] with `labels` [B] produce."""
        step = grad(self._loss)
        start = self.flat.to(Z.dtype)
        flat = start
        for _ in range(self.steps):
            flat = flat - self.lr * step(flat, Z, labels)
        return flat - start


def replay_fit(task: Task, params: Params, delta: Params, labels: torch.Tensor, start: torch.Tensor,
               lr: float, steps: int, public: torch.Tensor | None = None,
               public_labels: torch.Tensor | None = None, iterations: int = ITERATIONS, progress=None):
    """(unit-norm embeddings [B, D], diagnostics) that reproduce the observed `delta` of `steps`
    local steps at learning rate `lr`, with `labels` fixed, from the pseudo-gradient route's
    embeddings `start` [B, D] and (batch 1) the public embeddings of the label. `progress(done,
    total)` is called after every Jacobian (a few seconds each; it is where a run's stop or
    --attack-timeout takes effect).

    Residuals are replayed in float64: the client's own float32 steps match it to ~1e-6, while a
    float32 replay (another order of operations) is off by ~1e-5, where the fit still moves the
    embeddings. Jacobians only steer the steps, so they are taken in float32, at half the cost."""
    names = [n for n in delta if n in params]
    device = task.device
    target = torch.cat([delta[n].reshape(-1) for n in names]).detach().double().to(device)
    labels = labels.to(device)
    norm = float(target.norm())
    client = LocalSteps(task, params, names, lr, steps)

    def mismatch(Z: torch.Tensor) -> torch.Tensor:
        with precision(task.model, torch.float64):
            return client.delta(Z, labels) - target

    def jacobian(Z: torch.Tensor) -> torch.Tensor:
        with precision(task.model, torch.float32):
            return jacfwd(lambda z: client.delta(z, labels))(Z.float()).double().reshape(len(target), -1)

    starts = [start.detach().double().to(device)]
    if len(labels) == 1 and public is not None and public_labels is not None:
        own = public.double().to(device)[public_labels.to(device) == labels[0]]
        starts += [z.view(1, -1) for z in own]
    with second_order_attention():
        with torch.no_grad():
            ranked = sorted((float(mismatch(Z).norm()), k) for k, Z in enumerate(starts))
        done, total = 0, STARTS * iterations

        def counted(Z: torch.Tensor) -> torch.Tensor:
            nonlocal done
            J = jacobian(Z)
            done += 1
            if progress:
                progress(min(done, total), total)
            return J

        fits = []  # a fit can stall in a local minimum: then the next start
        for _, k in ranked[:STARTS]:
            fits.append(levenberg_marquardt(mismatch, counted, starts[k], iterations, TOLERANCE * norm))
            if fits[-1][1] < ACCEPT * norm:
                break
        Z, fitted = min(fits, key=lambda fit: fit[1])
    info = {"replayed_steps": steps, "replay_starts": len(fits), "replay_residual": fitted / norm}
    return F.normalize(Z, dim=-1).float(), info


def levenberg_marquardt(residual, jacobian, Z: torch.Tensor, steps: int,
                        tolerance: float) -> tuple[torch.Tensor, float]:
    """Unit-norm Z minimising ||residual(Z)||, `jacobian(Z)` [P, B*D] by forward mode (one tangent
    per entry of Z: 64 at batch 1 on the tiny CLIP); stops once the residual is under `tolerance`."""
    r, A, Jr = residual(Z), None, None
    lam = 1e-3
    for _ in range(steps):
        if float(r.norm()) < tolerance or lam > 1e8:
            break
        if A is None:  # Z moved: a new Jacobian (a rejected step keeps the old one)
            J = jacobian(Z)
            A, Jr = J.T @ J, J.T @ r  # A is singular along Z (the loss normalises it): the damping
        damped = A + lam * A.diagonal().mean() * torch.eye(len(A), dtype=A.dtype, device=A.device)
        candidate = F.normalize(Z + torch.linalg.solve(damped, -Jr).view(Z.shape), dim=-1)
        r_new = residual(candidate)
        if r_new.norm() < r.norm():
            Z, r, lam, A = candidate, r_new, lam / 3, None
        else:
            lam *= 5
    return Z, float(r.norm())
