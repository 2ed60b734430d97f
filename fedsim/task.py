"""The learning task, defined once: forward pass, loss and gradients of the trainable parameters.

Clients use it to train; attackers use the very same functions on dummy data, so the
attacker's model of the client can never drift from what the client really computes. All
functions are functional in the trainable parameters (`torch.func.functional_call`), so an
attack may pass its own parameter tensors and differentiate through the gradients.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn.attention import SDPBackend, sdpa_kernel

Params = dict[str, torch.Tensor]


class Task:
    """A model whose parameters that require grad are the trainable (PEFT) ones."""

    def __init__(self, model: nn.Module, num_classes: int, image_shape: tuple[int, int, int]):
        self.model = model
        self.num_classes = num_classes
        self.image_shape = image_shape  # (channels, height, width) of one input image, in [0, 1]
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        if not self.names:
            raise ValueError("the model has no trainable parameters")

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def trainable(self) -> Params:
        """Detached copies of the current trainable parameters, by name."""
        params = dict(self.model.named_parameters())
        return {n: params[n].detach().clone() for n in self.names}

    def load_trainable(self, params: Params) -> None:
        with torch.no_grad():
            current = dict(self.model.named_parameters())
            for name in self.names:
                current[name].copy_(params[name])

    def logits(self, params: Params, images: torch.Tensor) -> torch.Tensor:
        return functional_call(self.model, params, (images,))

    def loss(self, params: Params, images: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy. `targets` are class indices [B] or class probabilities [B, C]
        (soft labels, as DLG optimises them)."""
        return F.cross_entropy(self.logits(params, images), targets)

    def head_loss(self, params: Params, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The same loss entered after CLIP's image tower: `features` [B, D] are the tower's
        outputs (CLIP models only; see `fedsim.models.peft`)."""
        return F.cross_entropy(functional_call(self.model, params, (), {"features": features}), targets)

    def text_features(self, params: Params) -> torch.Tensor:
        """The unit-norm class text features [C, D] under `params` (CLIP models only)."""
        return functional_call(self.model, params, (), {"output": "text"})

    def embeddings(self, params: Params, images: torch.Tensor | None = None,
                   features: torch.Tensor | None = None) -> torch.Tensor:
        """The unit-norm image embeddings [B, D] the logits use, of images or of image-tower
        outputs (CLIP models only)."""
        return functional_call(self.model, params, (images,), {"features": features, "output": "embedding"})

    def gradients(self, params: Params, images: torch.Tensor, targets: torch.Tensor,
                  create_graph: bool = False) -> Params:
        """d loss / d params. With `create_graph` the result can itself be differentiated
        (gradient matching), which on CPU needs the math attention kernel."""
        leaves = {n: p if p.requires_grad else p.detach().requires_grad_(True) for n, p in params.items()}
        with second_order_attention() if create_graph else nullcontext():
            loss = self.loss(leaves, images, targets)
            grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=create_graph)
        return dict(zip(leaves, grads))

    def functional_gradients(self, params: Params, images: torch.Tensor, targets: torch.Tensor, aux=None):
        """d loss / d params built with `torch.func.grad`, so it composes with `vmap` (one call
        for many restarts) and can itself be differentiated w.r.t. the images.

        `aux`, a callable of no arguments, is called right after the forward pass (e.g. to read
        what forward hooks recorded); then the result is (gradients, aux()). Values read inside
        the forward must leave through it: tensors escaping `torch.func.grad` otherwise are not
        valid outside it."""
        if not getattr(self.model, "supports_vmap", True):
            # peft merges LoRA into nn.MultiheadAttention's weights in place, which torch.func
            # refuses: plain autograd with a graph gives the same differentiable gradients.
            grads = self.gradients(params, images, targets, create_graph=True)
            return grads if aux is None else (grads, aux())

        def loss(p):
            value = self.loss(p, images, targets)
            return value, aux()

        with second_order_attention():
            if aux is None:
                return grad(self.loss)(params, images, targets)
            return grad(loss, has_aux=True)(params)

    def batched_gradients(self, params: Params, images: torch.Tensor, targets: torch.Tensor) -> Params:
        """One gradient per restart: images [R, B, C, H, W], targets [R, B] or [R, B, C] ->
        each tensor [R, *shape]. Each restart's gradient is the mean over its own batch only,
        which is why restarts cannot simply be stacked into one big batch."""
        params = {n: p.detach() for n, p in params.items()}
        if not getattr(self.model, "supports_vmap", True):
            per = [self.functional_gradients(params, x, y) for x, y in zip(images, targets)]
            return {n: torch.stack([g[n] for g in per]) for n in params}
        return vmap(self.functional_gradients, in_dims=(None, 0, 0))(params, images, targets)

    def per_example_gradients(self, params: Params, images: torch.Tensor, labels: torch.Tensor) -> Params:
        """Gradients of each example's own loss, stacked on a leading batch dimension."""
        params = {n: p.detach() for n, p in params.items()}
        if not getattr(self.model, "supports_vmap", True):
            per = [self.gradients(params, x.unsqueeze(0), y.unsqueeze(0)) for x, y in zip(images, labels)]
            return {n: torch.stack([g[n] for g in per]) for n in params}

        def one(p: Params, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            return self.loss(p, x.unsqueeze(0), y.unsqueeze(0))

        with second_order_attention():
            return vmap(grad(one), in_dims=(None, 0, 0), randomness="different")(params, images, labels)


@contextmanager
def second_order_attention():
    """Attention that torch.func and double backward can differentiate: the fused
    scaled-dot-product kernels have no double backward on CPU, and nn.MultiheadAttention's
    inference fast path (which it takes inside torch.func, where no tensor "requires grad")
    has no derivative at all."""
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)


@contextmanager
def precision(model: nn.Module, dtype: torch.dtype):
    """The model's weights in `dtype` for the duration, then back in the precision they had
    (an attacker's float64 Jacobian or replay; the tiny CLIP converts in milliseconds)."""
    before = next(model.parameters()).dtype
    model.to(dtype)
    try:
        yield
    finally:
        model.to(before)


def unflatten(flat: torch.Tensor, names: list[str], shapes: list[torch.Size]) -> Params:
    """The named tensors a flat vector holds, in order (views of it, so gradients flow through)."""
    return dict(zip(names, (t.view(s) for t, s in zip(flat.split([s.numel() for s in shapes]), shapes))))
