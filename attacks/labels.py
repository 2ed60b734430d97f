"""Label recovery from a client update: analytic rules on the last linear layer's gradient.

Every strategy is a function `(observation, task) -> LongTensor [B]` (B = the observation's
batch size), registered in `STRATEGIES` by name; `recover_labels(name, observation, task)` looks
one up. Any attack may call them to fix its labels before optimising images.

All four rules read the gradient of the classifier: the last linear layer z = W h + b whose
outputs are the model's logits. With mean cross-entropy over a batch of B examples,

    dL/dW = (1/B) sum_b (p_b - y_b) h_b^T,        dL/db = (1/B) sum_b (p_b - y_b),

where p_b is the softmax output, y_b the one-hot label and h_b the layer's input. Only the
true class of an example has a negative factor p - y, which is what the rules exploit.

The classifier is found generically (`last_linear_layer`): the last `nn.Linear` of the Task's
model with `num_classes` outputs, a trainable weight, and whose output is the model's output.
LeNet, ConvNet and ResNet-18 have one (`fc`), so has CLIP `linear-probe` (`head`); the other
CLIP PEFT methods (coop, adapters, lora, vpt, full) have none and every strategy refuses them
with `LabelStrategyError` rather than guess.

Protocols: for a FedSGD update (kind "gradient") the formulas above hold exactly. For a FedAvg
weight delta the strategies read `observation.gradient()`, the pseudo-gradient
-delta / (lr * local_steps): the average of the gradients along the local SGD path, which equals
the gradient at the global weights only for one step. The rules are then approximate.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fedsim.observation import Observation
from fedsim.options import Option
from fedsim.task import Task

__all__ = ["LabelStrategyError", "LastLayer", "STRATEGIES", "class_probabilities", "gradinversion", "idlg", "ilrg",
           "ilrg_counts", "last_linear_layer", "layer_gradient", "llg", "recover_labels", "round_counts",
           "solve_counts", "strategy_labels", "LABEL_STRATEGY", "strategy_argument"]


class LabelStrategyError(ValueError):
    """A label strategy cannot run on this update or model; the message says why."""


@dataclass(frozen=True)
class LastLayer:
    """Parameter names of the classifier's weight [C, N] and bias [C] (None: no trainable bias)."""

    weight: str
    bias: str | None


# ------------------------------------------------------------------------- the last layer


def last_linear_layer(task: Task, strategy: str = "label recovery") -> LastLayer:
    """The classifier: the last `nn.Linear` (in module registration order) with
    `task.num_classes` outputs and a trainable weight, checked to produce the model's logits
    (so that, e.g., a LoRA factor that happens to have `num_classes` outputs is never taken)."""
    trainable = set(task.names)
    candidates = [(name, m) for name, m in task.model.named_modules()
                  if isinstance(m, nn.Linear) and m.out_features == task.num_classes
                  and _qualified(name, "weight") in trainable]
    for name, module in reversed(candidates):
        if _outputs_logits(task, module):
            bias = _qualified(name, "bias")
            return LastLayer(_qualified(name, "weight"), bias if bias in trainable else None)
    raise LabelStrategyError(
        f"label strategy {strategy!r} needs a trainable last linear layer with {task.num_classes} "
        f"outputs whose output is the model's logits; this model has none. The update holds "
        f"{_describe(task.names)}. (CLIP PEFT methods other than linear-probe have no such layer; "
        f"their label rule is the MIP attack's.)")


def _qualified(module: str, param: str) -> str:
    return f"{module}.{param}" if module else param


def _outputs_logits(task: Task, module: nn.Module) -> bool:
    seen = []
    handle = module.register_forward_hook(lambda _m, _i, out: seen.append(out))
    dtype = next(task.model.parameters()).dtype
    try:
        with torch.no_grad():
            logits = task.model(torch.zeros(1, *task.image_shape, device=task.device, dtype=dtype))
    finally:
        handle.remove()
    return bool(seen) and seen[-1].shape == logits.shape and torch.equal(seen[-1], logits)


def _describe(names: list[str], shown: int = 6) -> str:
    more = f", ... ({len(names)} in all)" if len(names) > shown else ""
    return "parameters " + ", ".join(names[:shown]) + more


def layer_gradient(observation: Observation, task: Task, strategy: str,
                   need_bias: bool = False) -> tuple[LastLayer, torch.Tensor, torch.Tensor | None]:
    """The classifier's names and its weight [C, N] and bias [C] gradients, in float64 on the CPU."""
    layer = last_linear_layer(task, strategy)
    if need_bias and layer.bias is None:
        raise LabelStrategyError(f"label strategy {strategy!r} needs the gradient of the last layer's bias; "
                                 f"the layer {layer.weight.rsplit('.', 1)[0]!r} has no trainable bias")
    grads = observation.gradient()
    missing = [n for n in (layer.weight, layer.bias) if n is not None and n not in grads]
    if missing:
        raise LabelStrategyError(f"label strategy {strategy!r}: the update has no {', '.join(missing)}; "
                                 f"it holds {_describe(sorted(grads))}")
    weight = grads[layer.weight].detach().double().cpu().flatten(1)
    bias = grads[layer.bias].detach().double().cpu() if layer.bias is not None else None
    return layer, weight, bias


# ------------------------------------------------------------------------- the strategies


def idlg(observation: Observation, task: Task) -> torch.Tensor:
    """iDLG (Zhao, Mopuri, Bilen 2020, arXiv 2001.02610): for one example, row i of the last
    weight gradient is (p_i - y_i) h, negative only for the true class when the features h are
    non-negative; the label is the argmin over classes of the row sums.

    A batch-1 rule: any other batch size raises `LabelStrategyError`. As in the paper it assumes
    non-negative features (sigmoid, ReLU); on signed features (e.g. CLIP linear-probe's
    normalised features) the sign of a row sum says nothing and the rule can be wrong.
    """
    if observation.batch_size != 1:
        raise LabelStrategyError(f"idlg is a batch-1 rule (Zhao et al. 2020); this update comes from "
                                 f"{observation.batch_size} examples. For batches use gradinversion "
                                 f"(distinct labels), llg or ilrg (repeated labels).")
    _, weight, _ = layer_gradient(observation, task, "idlg")
    return weight.sum(1).argmin().reshape(1)


def gradinversion(observation: Observation, task: Task) -> torch.Tensor:
    """GradInversion's label restoration (Yin et al., CVPR 2021, arXiv 2104.07586): for each
    class the minimum over features of its row of the last weight gradient; the labels are the
    B classes with the most negative minima.

    Assumes non-negative features and distinct labels in the batch: it returns B distinct
    classes, so a batch with a repeated label cannot be fully right, and B > num_classes
    raises `LabelStrategyError`. No departure from the rule (the paper states it on the
    transposed matrix, hence "column-wise" there).
    """
    batch = observation.batch_size
    if batch > task.num_classes:
        raise LabelStrategyError(f"gradinversion returns distinct labels; batch size {batch} exceeds the "
                                 f"{task.num_classes} classes. Use llg or ilrg for repeated labels.")
    _, weight, _ = layer_gradient(observation, task, "gradinversion")
    return weight.min(1).values.argsort()[:batch]


def llg(observation: Observation, task: Task) -> torch.Tensor:
    """LLG, the simple variant (Wainakh et al., PoPETs 2022, arXiv 2105.09369): g_i = row sums
    of the last weight gradient.
    1. Every class with g_i < 0 is predicted once.
    2. The impact of one example is estimated as m = (sum of the negative g_i / B) * (1 + 1/C),
       and m is subtracted from the g_i of the classes taken (m < 0, so they grow).
    3. The remaining slots are filled greedily: take the class with the smallest g, subtract m
       from it, repeat until B labels.
    Repeated labels are allowed. Departure: when more than B classes have g_i < 0 (possible
    only for an approximate gradient, e.g. a FedAvg delta or noise) the B most negative are
    kept, so the output always has exactly B labels.
    """
    batch = observation.batch_size
    _, weight, _ = layer_gradient(observation, task, "llg")
    g = weight.sum(1)
    negative = (g < 0).nonzero().flatten()
    negative = negative[g[negative].argsort()][:batch]
    impact = g[negative].sum() / batch * (1 + 1 / task.num_classes)
    labels = negative.tolist()
    g[negative] -= impact
    while len(labels) < batch:
        best = int(g.argmin())
        labels.append(best)
        g[best] -= impact
    return torch.tensor(labels, dtype=torch.long)


def ilrg_counts(observation: Observation, task: Task) -> tuple[torch.Tensor, torch.Tensor]:
    """iLRG's per-class counts: (rounded integer counts summing to B, the raw least-squares
    solution), both [C]. See `ilrg`."""
    layer, weight, bias_grad = layer_gradient(observation, task, "ilrg", need_bias=True)
    w = observation.global_params[layer.weight].detach().double().cpu().flatten(1)
    b = observation.global_params[layer.bias].detach().double().cpu()
    probs = class_probabilities(weight, bias_grad, w, b)
    raw = solve_counts(probs, bias_grad, observation.batch_size)
    return round_counts(raw, observation.batch_size), raw


def class_probabilities(weight_grad: torch.Tensor, bias_grad: torch.Tensor, w: torch.Tensor,
                        b: torch.Tensor) -> torch.Tensor:
    """p̂_j = softmax(W ê_j + b) with ê_j = dW_j / db_j, one row per class j. A class whose bias
    gradient is exactly 0 has no defined embedding; it gets ê_j = 0 (its column then barely
    matters: such a class is absent unless the model is certain of it)."""
    safe = torch.where(bias_grad == 0, torch.ones_like(bias_grad), bias_grad)
    embeddings = torch.where((bias_grad == 0)[:, None], 0.0, weight_grad / safe[:, None])
    return torch.softmax(embeddings @ w.T + b, dim=1)


def solve_counts(probs: torch.Tensor, bias_grad: torch.Tensor, batch: int) -> torch.Tensor:
    """Least-squares counts k from  sum_j k_j p̂_j[i] - k_i = B db_i  (each class i) and
    sum_j k_j = B, by the Moore-Penrose pseudo-inverse."""
    classes = probs.shape[0]
    system = torch.cat([probs.T - torch.eye(classes, dtype=probs.dtype), torch.ones(1, classes, dtype=probs.dtype)])
    target = torch.cat([batch * bias_grad, torch.tensor([float(batch)], dtype=probs.dtype)])
    return torch.linalg.pinv(system) @ target


def round_counts(raw: torch.Tensor, batch: int) -> torch.Tensor:
    """Clip to [0, B], round, then move the total to B one unit at a time on the class whose
    rounding error is largest in the needed direction."""
    raw = raw.clamp(0, batch)
    counts = raw.round()
    while counts.sum() < batch:
        counts[(raw - counts).argmax()] += 1
    while counts.sum() > batch:
        excess = torch.where(counts > 0, counts - raw, torch.tensor(-float("inf"), dtype=raw.dtype))
        counts[excess.argmax()] -= 1
    return counts.long()


def ilrg(observation: Observation, task: Task) -> torch.Tensor:
    """iLRG (Ma et al., "Instance-wise Batch Label Restoration via Gradients in Federated
    Learning", ICLR 2023, openreview FIrQfNSOoTr): per-class counts from the last layer's
    weight and bias gradients.
    1. Class embeddings ê_j = dW_j / db_j (row j of the weight gradient over the bias gradient).
    2. Class probabilities p̂_j = softmax(W ê_j + b), through the last layer at the
       observation's global parameters.
    3. Counts k: sum_j k_j = B and, for each class i, sum_j k_j p̂_j[i] - k_i = B db_i (the mean
       bias gradient with the batch's softmax outputs approximated per class), solved with the
       pseudo-inverse.
    4. Round to integers summing to B; the labels are each class repeated k_j times.
    Exact when examples of one class share their output probabilities (typical of untrained
    networks, the paper's main setting). Needs a trainable bias.

    Checked against the reference code (BUAA-CST/iLRG: methods.get_emb, methods.iLRG,
    utils.post_process_emb): this is its full method, the one its tables report. The low-rank
    structure of the weight gradient (rank <= B) appears there only in the SVD baseline it
    compares with (RLG, Dang et al. 2021), not in iLRG's own pipeline; its "simplified"
    variant assumes the set of present classes is known, which the server does not know.

    Departures: in step 1 the reference clamps the decimal exponent of each ratio dW_j/db_j to
    +-10 and treats db_j = 0 as 1e-64; here db_j = 0 gives ê_j = 0 and ratios are not clamped
    (the clamp never binds on the models tested: on digits at batch 16 the largest |ratio| over
    50 batches is 44 on LeNet, 0.76 on ConvNet). In step 4 the reference clips
    negatives to 0 and zeroes estimates above B; here estimates are clipped to [0, B], so a
    batch of a single class is not zeroed by an estimate a hair above B. Then, as there, the
    total is fixed to B on the classes with the largest rounding error.

    Where it fails: when a present class's db_j is near 0 (its count close to B times its mean
    probability), ê_j extrapolates far outside the batch's features and p̂_j is wrong; DLG's
    LeNet, whose U(-0.5, 0.5) classifier gives several classes 10-25 % on every image, hits this
    at 10 classes and batch 16: its embeddings reach 44 where its sigmoid features lie in (0, 1)
    (README, "Label recovery"; experiments/label_recovery.py reports
    min_j |B db_j| per batch, which the server can compute).
    """
    counts, _ = ilrg_counts(observation, task)
    return torch.repeat_interleave(torch.arange(len(counts)), counts)


Strategy = Callable[[Observation, Task], torch.Tensor]

STRATEGIES: dict[str, Strategy] = {
    "idlg": idlg,
    "gradinversion": gradinversion,
    "llg": llg,
    "ilrg": ilrg,
}


def recover_labels(name: str, observation: Observation, task: Task) -> torch.Tensor:
    """Run the strategy called `name`: class indices [B] (LongTensor, on the CPU)."""
    if name not in STRATEGIES:
        raise LabelStrategyError(f"unknown label strategy {name!r}; valid: {', '.join(STRATEGIES)}")
    return STRATEGIES[name](observation, task)


def strategy_labels(strategy: str, observation: Observation, task: Task) -> torch.Tensor:
    """Labels from a named strategy, as a LongTensor [B]. Raises LabelStrategyError (a
    ValueError) when the strategy does not apply to the observation."""
    return torch.as_tensor(recover_labels(strategy, observation, task), dtype=torch.long)


OWN, JOINT = "default", "optimise"  # the option's two values that are not rules
LABEL_STRATEGY = Option("label_strategy", OWN, "how the attack gets labels: default (the attack's own), "
                        "optimise (soft labels optimised jointly, DLG-style), or a rule: " + ", ".join(STRATEGIES),
                        choices=(OWN, JOINT, *STRATEGIES), key="label_strategy")


def strategy_argument(value: str | None, own: str | None) -> str | None:
    """The `--label-strategy` value as an attack's argument: a rule's name, or None for joint
    optimisation; `default` gives the attack's own choice `own`."""
    if value == OWN:
        return own
    return None if value in (None, JOINT) else value
