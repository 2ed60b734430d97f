"""Privacy audit without attacking: the Inversion Influence Function (I2F).

I2F (Zhang, Hong, Deng, Mahdavi, Zhou, "Understanding Deep Gradient Leakage via Inversion
Influence Functions", NeurIPS 2023, arXiv 2309.13016) predicts how far an optimal gradient-inversion
attacker, G_r(g) = argmin_x ||grad_theta L(x, theta) - g||^2, lands from the true input x0 when the
shared gradient is perturbed, g = grad_theta L(x0, theta) + delta:

    ||G_r(g0 + delta) - x0||  ~  I(delta; x0) = ||(J J^T)^{-1} J delta||            (Eq. 4)
                              >= ||J delta|| / lambda_max(J J^T) = I_lb(delta; x0)   (Eq. 5)

with J = d^2 L / dx dtheta^T in R^{d_x x d_theta}, the Jacobian of the parameter gradient w.r.t. the
input (its transpose maps an input direction to the change of the gradient). Only products with J
and J^T are needed, so nothing of size d_x x d_theta is ever formed:

- J delta   = grad_x <grad_theta L(x, theta), delta>, one double backward through a graph of the
  gradient built once per input (`GradientMap`);
- J^T v     = the directional derivative of the gradient along v, by the double-vjp trick
  (differentiate u -> J u, which is linear in u, w.r.t. u along v): a third backward;
- (J J^T)^{-1} J delta by conjugate gradients on J J^T + mu I, matrix-free, from zero:
  relative residual tolerance `cg_tol` (default 1e-6 in float64, 1e-5 in float32), at most
  `cg_maxiter` (default 500) iterations. mu = `rel_damping` * lambda_max + `damping`, by default
  1e-4 * lambda_max: J J^T is badly conditioned (LeNet at its DLG init: cond > 2e7, and the
  undamped CG solution keeps growing with iterations: 1.66, 3.00, 3.61 after 300, 1000, 3000
  iterations), so the undamped value is dominated by directions along which the gradient hardly
  changes and which no attacker resolves either. The reference code's gradient descent
  (lr 0.01, 2000 steps) has the same effect: it only resolves eigenvalues above ~0.05, i.e.
  ~5e-4 lambda_max on LeNet. `rel_damping=0` gives the undamped value; on a singular J J^T (more
  input dimensions than trainable parameters) CG from zero on this consistent system then
  converges to the minimum-norm solution, i.e. the pseudo-inverse;
- lambda_max(J J^T) by scipy.sparse.linalg.eigsh (k=1, largest algebraic, Lanczos) on a
  LinearOperator, as the reference code does (which works in parameter space, J^T J; the nonzero
  spectrum is the same and the input space is the smaller one here).

The input is the whole batch [B, C, H, W] (the attacker reconstructs the batch), so J has
B*C*H*W rows; the per-image share of the predicted error is reported too.

Reliability: CG's coefficients give the Lanczos tridiagonal matrix of J J^T, whose extreme Ritz
values estimate the condition number (`cond_est`) for free. The result is flagged not `reliable`
when CG did not reach its tolerance or when cond_est * cg_tol > `max_error_bound` (the relative
error of the solution is bounded by cond * relative residual), i.e. when J J^T is too
ill-conditioned for the residual to pin the answer down.

Departures from the paper and its reference code:
- The exact I2F solves (J J^T) b = J delta by conjugate gradients instead of the reference code's
  plain gradient descent (lr 0.01, 2000 iterations, stop at ||step|| < 9e-5); CG reaches the same
  solution far faster and its stopping rule is a residual, not a step size. The damping mu plays
  the role of the reference code's `regu`, scaled to lambda_max so it means the same on any model.
- Computation in float64 on a copy of the model for classic models (LeNet's sigmoid network is
  badly conditioned); CLIP models stay in float32 (their frozen text features are cached tensors).
- Predicted RMSE = I2F / sqrt(numel of the input) and predicted PSNR = 10 log10(1 / RMSE^2),
  assuming images in [0, 1] (fedsim's range); the paper reports MSE and RMSE.
- CLIP PEFT: besides pixels, the same analysis w.r.t. the image tower's output (`space=
  "embedding"`, J = d PEFT-gradient / d features, through `Task.head_loss`), which is what MIP
  recovers; only where no trainable parameter sits inside the image tower (not vpt, full, or LoRA
  on the image tower). The predicted error there is in feature units (no PSNR).
- I2F is a first-order (linearised) prediction: for perturbations comparable to the gradient itself
  (heavy pruning, large noise) it is outside its regime, and rmse_pred is not capped at the
  images' range (a predicted PSNR below ~10 dB means "the attacker learns little", not a number).
- Rounds after the first are audited at the global parameters the run would reach, re-derived from
  every client's defended update without attacking (`Setting.global_weights`; needs --fraction 1).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fedsim.task import Params, Task, second_order_attention

__all__ = ["i2f", "expected_perturbation", "audit", "embedding_applicable", "GradientMap", "conjugate_gradient"]

COLUMNS = ("i2f", "i2f_lb", "rmse_pred", "rel_error", "psnr_pred", "delta_norm", "jdelta_norm", "lambda_max",
           "cond_est", "damping", "cg_iters", "cg_residual", "reliable", "seconds")  # audit()'s, from i2f()
FEATURE_PEFT = ("coop", "adapter", "text-adapter", "double-adapter", "linear-probe")


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _is_clip(task: Task) -> bool:
    return hasattr(task.model, "encode_image")


def embedding_applicable(cfg) -> bool:
    """Whether the PEFT gradient is a function of the image tower's output alone (no trainable
    parameter inside the image tower), so that I2F w.r.t. the embedding is defined."""
    if cfg.model in ("lenet", "convnet", "resnet18"):
        return False
    return cfg.peft in FEATURE_PEFT or (cfg.peft == "lora" and cfg.lora_tower == "text")


class GradientMap:
    """x -> the flattened mean gradient of the loss w.r.t. the trainable parameters, at one input
    x0 (pixels [B, C, H, W] or features [B, D]), with products by J (d_x x d_theta) and J^T.

    The gradient's graph is built once (create_graph); each product is one (J delta) or two
    (J^T v) further backward passes through it."""

    def __init__(self, task: Task, params: Params, inputs: torch.Tensor, labels: torch.Tensor,
                 space: str = "pixels", dtype: torch.dtype | None = None):
        if space not in ("pixels", "embedding"):
            raise ValueError(f"space must be pixels or embedding, got {space!r}")
        clip = _is_clip(task)
        self.dtype = dtype or (torch.float32 if clip else torch.float64)
        device = task.device
        model = task.model
        if self.dtype != next(model.parameters()).dtype:
            model = copy.deepcopy(model).to(self.dtype)
        self.model, self.space = model, space
        self.names = list(params)
        self.params = {n: p.detach().to(device, self.dtype).requires_grad_(True) for n, p in params.items()}
        self.x0 = inputs.detach().to(device, self.dtype).requires_grad_(True)
        self.labels = labels.to(device)
        with second_order_attention():
            if space == "pixels":
                logits = functional_call(model, self.params, (self.x0,))
            else:
                logits = functional_call(model, self.params, (), {"features": self.x0})
            loss = F.cross_entropy(logits, self.labels)
            self.g = _flat(torch.autograd.grad(loss, list(self.params.values()), create_graph=True))
        self.d_x, self.d_theta = self.x0.numel(), self.g.numel()
        # u -> J u, built once with a graph so that J^T v is its derivative w.r.t. u along v
        self._u = torch.zeros_like(self.g, requires_grad=True)
        with second_order_attention():
            ju = torch.autograd.grad(self.g, self.x0, self._u, create_graph=True, retain_graph=True)[0]
        self._ju = ju.reshape(-1)

    def J(self, delta: torch.Tensor) -> torch.Tensor:
        """J delta, delta in parameter space [d_theta] -> input space [d_x]."""
        with second_order_attention():
            out = torch.autograd.grad(self.g, self.x0, delta.to(self.g), retain_graph=True, allow_unused=True)[0]
        if out is None:
            return torch.zeros(self.d_x, dtype=self.dtype, device=self.g.device)
        return out.reshape(-1).detach()

    def JT(self, v: torch.Tensor) -> torch.Tensor:
        """J^T v, v in input space [d_x] -> parameter space [d_theta]."""
        with second_order_attention():
            out = torch.autograd.grad(self._ju, self._u, v.to(self._ju), retain_graph=True, allow_unused=True)[0]
        return torch.zeros(self.d_theta, dtype=self.dtype, device=self.g.device) if out is None else out.detach()

    def JJT(self, v: torch.Tensor) -> torch.Tensor:
        return self.J(self.JT(v))

    def flat_delta(self, delta: Params | torch.Tensor) -> torch.Tensor:
        if isinstance(delta, dict):
            delta = _flat([delta[n].to(self.g.device, self.dtype) for n in self.names])
        return delta.reshape(-1).to(self.g.device, self.dtype)


@dataclass
class CGResult:
    x: torch.Tensor
    iterations: int
    residual: float  # final ||b - A x|| / ||b||
    converged: bool
    ritz: tuple[float, float]  # (smallest, largest) Ritz value of A from CG's Lanczos matrix


def conjugate_gradient(matvec, b: torch.Tensor, tol: float, maxiter: int) -> CGResult:
    """Solve A x = b for a symmetric positive semi-definite A given as `matvec`, from x = 0.
    Stops when ||r|| <= tol ||b||. Also returns the extreme eigenvalues of the Lanczos
    tridiagonal matrix built from CG's coefficients (estimates of A's extreme eigenvalues)."""
    x = torch.zeros_like(b)
    bnorm = float(b.norm())
    if bnorm == 0:
        return CGResult(x, 0, 0.0, True, (math.nan, math.nan))
    r = b.clone()
    p = r.clone()
    rr = float(r @ r)
    alphas, betas = [], []
    it, rel = 0, 1.0
    for it in range(1, maxiter + 1):
        Ap = matvec(p)
        pAp = float(p @ Ap)
        if pAp <= 0:  # direction in A's null space (or round-off): nothing more to gain
            it -= 1
            break
        alpha = rr / pAp
        x = x + alpha * p
        r = r - alpha * Ap
        rr_new = float(r @ r)
        alphas.append(alpha)
        rel = math.sqrt(rr_new) / bnorm
        if rel <= tol:
            break
        beta = rr_new / rr
        betas.append(beta)
        p = r + beta * p
        rr = rr_new
    # Lanczos tridiagonal: T_jj = 1/alpha_j + beta_{j-1}/alpha_{j-1}, T_j,j+1 = sqrt(beta_j)/alpha_j
    ritz = (math.nan, math.nan)
    if alphas:
        k = len(alphas)
        diag = np.array([1 / alphas[j] + (betas[j - 1] / alphas[j - 1] if j > 0 else 0.0) for j in range(k)])
        off = np.array([math.sqrt(betas[j]) / alphas[j] for j in range(k - 1)])
        eig = np.linalg.eigvalsh(np.diag(diag) + np.diag(off, 1) + np.diag(off, -1))
        ritz = (float(eig[0]), float(eig[-1]))
    return CGResult(x, it, rel, rel <= tol, ritz)


def lambda_max(gmap: GradientMap, tol: float = 1e-3, maxiter: int | None = None) -> float:
    """The largest eigenvalue of J J^T, by scipy's eigsh (Lanczos) on a LinearOperator."""
    from scipy.sparse.linalg import LinearOperator, eigsh

    n = gmap.d_x
    if n == 1:
        v = torch.ones(1, dtype=gmap.dtype, device=gmap.g.device)
        return float(gmap.JJT(v)[0])

    def mv(v):
        t = torch.as_tensor(np.asarray(v).reshape(-1), dtype=gmap.dtype, device=gmap.g.device)
        return gmap.JJT(t).cpu().numpy()

    op = LinearOperator((n, n), matvec=mv, dtype=np.float64 if gmap.dtype == torch.float64 else np.float32)
    v0 = np.random.default_rng(0).standard_normal(n)
    vals = eigsh(op, k=1, which="LA", tol=tol, maxiter=maxiter or 20 * n, v0=v0, return_eigenvectors=False)
    return float(vals[0])


def i2f(task: Task, params: Params, images: torch.Tensor, labels: torch.Tensor,
        delta: Params | torch.Tensor, *, space: str = "pixels", features: torch.Tensor | None = None,
        cg_tol: float | None = None, cg_maxiter: int = 500, damping: float = 0.0, rel_damping: float = 1e-4,
        max_error_bound: float = 0.1, dtype: torch.dtype | None = None, gmap: GradientMap | None = None,
        with_lambda: bool = True) -> dict[str, Any]:
    """I2F of the perturbation `delta` (by parameter name, in gradient units, or flat) at the true
    batch (`images` [B, C, H, W], `labels` [B]) and parameters `params`.

    `space="embedding"` (CLIP PEFT whose trainable parameters are outside the image tower): the
    input is the image tower's output [B, D], `features` if given, else computed from `images`.

    Returns a dict: i2f (= ||(J J^T + mu I)^{-1} J delta||, mu = rel_damping * lambda_max + damping),
    i2f_lb (||J delta|| / (lambda_max + mu), a lower bound of that i2f),
    rmse_pred (i2f / sqrt(d_x)), rel_error (i2f / ||input||: comparable across spaces),
    psnr_pred (10 log10(1 / rmse_pred^2); NaN for embeddings),
    per_image (the predicted error's norm for each image of the batch), jdelta_norm, delta_norm,
    lambda_max (of the undamped J J^T), damping (mu), cond_est (of J J^T + mu I), cg_iters,
    cg_residual, converged, reliable, d_x, d_theta, seconds.
    A `gmap` (GradientMap) built for the same input may be passed to reuse its graph."""
    start = time.perf_counter()
    if gmap is None:
        if space == "embedding":
            if features is None:
                with torch.no_grad():
                    features = task.model.encode_image(images.to(task.device))
            inputs = features
        else:
            inputs = images
        gmap = GradientMap(task, params, inputs, labels, space, dtype)
    tol = cg_tol if cg_tol is not None else (1e-6 if gmap.dtype == torch.float64 else 1e-5)
    d = gmap.flat_delta(delta)
    if d.numel() != gmap.d_theta:
        raise ValueError(f"delta has {d.numel()} entries, the trainable parameters {gmap.d_theta}")
    b = gmap.J(d)
    jnorm = float(b.norm())
    lam0 = lambda_max(gmap) if (with_lambda or rel_damping) else math.nan
    damping = damping + (rel_damping * lam0 if rel_damping else 0.0)
    matvec = gmap.JJT if damping == 0 else (lambda v: gmap.JJT(v) + damping * v)
    cg = conjugate_gradient(matvec, b, tol, cg_maxiter)
    value = float(cg.x.norm())
    lam = lam0 + damping
    lo, hi = cg.ritz
    cond = hi / lo if lo > 0 else math.inf
    if not math.isnan(lam) and lo > 0:
        cond = max(cond, lam / lo)
    if jnorm == 0:
        cond = math.nan
    lb = math.nan if math.isnan(lam) else jnorm / lam if lam > 0 else (0.0 if jnorm == 0 else math.inf)
    rmse = value / math.sqrt(gmap.d_x)
    reliable = bool(cg.converged and (jnorm == 0 or cond * tol <= max_error_bound))
    per_image = cg.x.reshape(gmap.x0.shape[0], -1).norm(dim=1).cpu().tolist()
    return {"i2f": value, "i2f_lb": lb, "rmse_pred": rmse,
            "psnr_pred": (math.inf if rmse == 0 else -20 * math.log10(rmse)) if space == "pixels" else math.nan,
            "rel_error": value / max(float(gmap.x0.detach().norm()), 1e-30), "per_image": per_image,
            "jdelta_norm": jnorm, "delta_norm": float(d.norm()), "lambda_max": lam0,
            "cond_est": cond, "damping": damping, "cg_iters": cg.iterations, "cg_residual": cg.residual,
            "converged": cg.converged,
            "reliable": reliable, "d_x": gmap.d_x, "d_theta": gmap.d_theta,
            "seconds": time.perf_counter() - start}


# -- the defenses' perturbation ------------------------------------------------------------------

def _update_scale(protocol) -> float:
    """Gradient units per update unit: FedSGD sends the gradient; a FedAvg delta of `steps` plain
    SGD steps reads as the pseudo-gradient -delta / (lr * steps)."""
    return 1.0 if protocol.name == "fedsgd" else -1.0 / (protocol.lr * protocol.steps_behind(protocol.batch_size))


def expected_perturbation(setting, images: torch.Tensor, labels: torch.Tensor, params: Params | None = None,
                          noise: float = 0.0, generator: torch.Generator | None = None,
                          clean: Params | None = None) -> tuple[Params, list[str]]:
    """A random draw of the perturbation delta (gradient units, by parameter name) the config's
    defense chain adds to the clean gradient of this batch, and notes on what was modelled.

    Each defense of the chain, in order, acts on a running copy of the clean gradient through its
    own `Defense.audited` (fedsim.api): DP-SGD and dp-update add their Gaussian noise (clipping
    left out: a rescaling, not noise); prune and quantize apply their transform of the update, so
    delta holds minus the pruned entries or the actual rounding error; soteria its transform of
    the gradient; flower-dp and secagg (they act in Flower's protocol) are noted as not modelled.
    Then `noise` > 0 (the caller's `--audit-noise`) adds N(0, noise^2) on every entry: the
    perturbation to audit when there is no defense, or on top of one.
    A FedAvg delta is converted to gradient units by lr * local steps (with --local-epochs, by the
    steps of one batch: an approximation), since I2F's map is the gradient's."""
    task = setting.task
    device = task.device
    images, labels = images.to(device), labels.to(device)
    params = {n: p.to(device) for n, p in (params or task.trainable()).items()}
    gen = generator or torch.Generator().manual_seed(0)
    if clean is None:
        clean = {n: g.detach() for n, g in task.gradients(params, images, labels).items()}
    scale = _update_scale(setting.protocol)
    current = {n: g.clone() for n, g in clean.items()}
    notes = []
    for defense in getattr(setting.defense, "defenses", []):
        current, note = defense.audited(current, task, params, images, labels, scale, gen)
        notes.append(note)
    if noise > 0:
        current = {n: g + noise * torch.randn(g.shape, generator=gen, dtype=g.dtype).to(device)
                   for n, g in current.items()}
        notes.append(f"audit noise: Gaussian std {noise:.3g}")
    return {n: current[n] - clean[n] for n in clean}, notes


# -- the audit -----------------------------------------------------------------------------------

def audit(setting, noise: float = 0.0, clients: list[int] | None = None, rounds: tuple[int, ...] | None = None,
          spaces: tuple[str, ...] | None = None, cg_tol: float | None = None, cg_maxiter: int = 500,
          damping: float = 0.0, rel_damping: float = 1e-4, seed: int = 0, progress=None):
    """I2F for every client of every round (default: the config's rounds) at that round's global
    model (`Setting.global_weights`): one row per (round, client, space) with columns round, client,
    label (the client's most common class), labels, batch_size, space, i2f, i2f_lb, rmse_pred,
    rel_error, psnr_pred, delta_norm, jdelta_norm, lambda_max, cond_est, cg_iters, cg_residual,
    reliable, perturbation (what was modelled), seconds.

    Uses `setting.observe` for the client's true batch and the global parameters (the auditor, the
    deployment's engineer, has the truth), draws the defense's perturbation with
    `expected_perturbation` (seeded by `seed`, round and client) and never runs an attack.
    `spaces`: "pixels" and/or "embedding"; default pixels for classic models, embedding for CLIP
    where defined (see `embedding_applicable`), else pixels."""
    import pandas as pd

    from fedsim.models import derive_seed

    cfg = setting.cfg
    if spaces is None:
        spaces = ("embedding",) if embedding_applicable(cfg) else ("pixels",)
    for space in spaces:
        if space == "embedding" and not embedding_applicable(cfg):
            raise ValueError(f"I2F w.r.t. the embedding needs a CLIP PEFT outside the image tower "
                             f"({', '.join(FEATURE_PEFT)}, lora on the text tower); got {cfg.model}/{cfg.peft}")
    rounds = tuple(range(1, cfg.rounds + 1)) if rounds is None else tuple(rounds)
    clients = list(range(cfg.clients)) if clients is None else list(clients)
    rows = []
    total = len(rounds) * len(clients)
    done = 0
    for round_ in rounds:
        weights = setting.global_weights(round_)
        for client in clients:
            obs, truth = setting.observe(round_, client, weights)
            params = {n: p.to(setting.task.device) for n, p in obs.global_params.items()}
            gen = torch.Generator().manual_seed(derive_seed(seed, round_, client, "audit"))
            delta, notes = expected_perturbation(setting, truth.images, truth.labels, params, noise, gen)
            labels = truth.labels.tolist()
            for space in spaces:
                out = i2f(setting.task, params, truth.images.to(setting.task.device), truth.labels, delta,
                          space=space, cg_tol=cg_tol, cg_maxiter=cg_maxiter, damping=damping,
                          rel_damping=rel_damping)
                rows.append({"round": round_, "client": client, "label": max(set(labels), key=labels.count),
                             "labels": " ".join(map(str, labels)), "batch_size": len(labels), "space": space,
                             **{key: out[key] for key in COLUMNS},
                             "perturbation": "; ".join(notes) or "none"})
            done += 1
            if progress is not None:
                progress(done, total)
    return pd.DataFrame(rows)


def summary(frame) -> dict[str, Any]:
    """Per-class and overall summaries of an audit frame (medians; the share reliable)."""
    cols = ["i2f", "i2f_lb", "rmse_pred", "psnr_pred"]
    per_class = frame.groupby(["space", "label"])[cols].median()
    per_class["clients"] = frame.groupby(["space", "label"]).size()
    overall = frame.groupby("space")[cols].median()
    overall["reliable"] = frame.groupby("space")["reliable"].mean()
    return {"per_class": per_class, "overall": overall}
