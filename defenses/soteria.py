"""Soteria (Sun, Qian, Chen, Xu, Zhang, Li, CVPR 2021, arXiv 2012.06043): perturb the gradient
of the layer that receives the data representation.

For every unit f of the representation r (the input of that layer) the client scores how much
the input must change to change r_f: s_f = sum over the batch of ||d r_f / d x|| / (|r_f| + 0.1),
and masks the `ratio` share of units with the smallest scores (the units whose value says most
about the input) in that layer's weight gradient (the columns that multiply r_f). Gradients of
the other layers are left as they are. The score and the mask follow the authors' code (their
+0.1 in the denominator keeps dead ReLU units finite); departures: the mask removes exactly
round(ratio * F) units instead of thresholding at a percentile, and it is applied in every
local step (the paper's FedAvg analysis masks every local gradient as well).

The representation layer, by model: classic CNNs (LeNet, ConvNet, ResNet-18) -> `fc`, the
classifier on the flattened features, as in the paper; CLIP with `adapter` or `double-adapter`
-> `image_adapter.fc1`, the adapter's first layer, whose input is the frozen CLIP image
embedding (the representation MIP-style attacks recover); `linear-probe` -> `head`, the linear
classifier on that embedding. Other PEFT methods (coop, vpt, lora, text-adapter, full CLIP) have
no trainable layer whose input is the image representation, and the defense refuses them.
"""

from __future__ import annotations

import torch
from torch.func import jacrev

from fedsim.api import Defense
from fedsim.options import Option, within
from fedsim.task import Params, Task, second_order_attention

REPRESENTATION_LAYERS = ("image_adapter.fc1", "head", "fc")  # searched in this order


def representation_layer(task: Task) -> str:
    """The trainable layer whose input is the image representation; see the module docstring."""
    modules = dict(task.model.named_modules())
    for name in REPRESENTATION_LAYERS:
        if name in modules and f"{name}.weight" in task.names:
            return name
    raise ValueError("soteria needs a trainable layer fed by the image representation: "
                     f"{', '.join(REPRESENTATION_LAYERS)} (classic models; CLIP with --peft adapter, "
                     "double-adapter or linear-probe); this model trains none of them")


def unit_scores(task: Task, params: Params, images: torch.Tensor, layer: str) -> torch.Tensor:
    """s_f = sum_b ||d r_bf / d x_b|| / (|r_bf| + 0.1) for every unit f of the layer's input r.

    The examples of a batch do not interact in fedsim's models (they run in eval mode: no batch
    statistics), so d(sum_b r_bf)/d x_b = d r_bf / d x_b, and one Jacobian of the batch-summed
    representation gives every example's: F vector-Jacobian products instead of B * F."""
    module = task.model.get_submodule(layer)
    captured: list[torch.Tensor] = []
    hook = module.register_forward_hook(lambda m, inputs, out: captured.append(inputs[0]))

    def representation(x: torch.Tensor) -> torch.Tensor:
        captured.clear()
        task.logits(params, x)
        return captured[-1].reshape(x.shape[0], -1)

    try:
        with second_order_attention():
            jac = jacrev(lambda x: representation(x).sum(0))(images)  # [F, B, C, H, W]
            with torch.no_grad():
                r = representation(images)  # [B, F]
    finally:
        hook.remove()
    return (jac.flatten(2).norm(dim=2).T / (r.abs() + 0.1)).sum(0)


class Soteria(Defense):
    name = "soteria"
    options = (Option("ratio", 0.8, "share of representation units masked in the gradient of the layer they feed",
                      **within(0, 1)),)

    def __init__(self, ratio: float = 0.8):
        if not 0 <= ratio < 1:
            raise ValueError(f"soteria ratio must be in [0, 1), got {ratio}")
        self.ratio = ratio

    def transform_gradient(self, grads: Params, task: Task, params: Params, images: torch.Tensor,
                           labels: torch.Tensor, generator: torch.Generator) -> Params:
        layer = representation_layer(task)
        params = {n: p.detach() for n, p in params.items()}
        scores = unit_scores(task, params, images, layer)
        mask = torch.ones_like(scores)
        mask[scores.argsort()[:round(self.ratio * scores.numel())]] = 0
        name = f"{layer}.weight"
        return {**grads, name: grads[name] * mask.to(grads[name].dtype)}
