"""What a client does in a round, independent of Flower: FedSGD or FedAvg behind a defense.

FedSGD: the client sends the gradient of one seeded batch.
FedAvg: the client takes `local_steps` plain-SGD steps on that batch (or, with
`local_epochs` > 0, that many passes over all its data in seeded batches) and sends the weight
delta (new - global). The defense computes every gradient (DP-SGD clips and noises each step)
and transforms the update before it leaves.
"""

from __future__ import annotations

import numpy as np
import torch

from fedsim.config import RunConfig
from fedsim.data import FederatedData
from fedsim.protocol import Protocol
from fedsim.task import Params, Task


def client_examples(cfg: RunConfig, data: FederatedData, round_: int, client: int):
    """The examples behind a client's update in a round; the evaluator re-derives them here."""
    if cfg.protocol == "fedavg" and cfg.local_epochs > 0:
        return data.client_data(client)
    return data.client_batch(cfg, round_, client)


def _epoch_batches(protocol: Protocol, n: int, shuffle: tuple[int, ...]):
    for epoch in range(protocol.local_epochs):
        order = np.random.default_rng([*shuffle, epoch]).permutation(n)
        for start in range(0, n, protocol.batch_size):
            yield torch.as_tensor(order[start:start + protocol.batch_size])


def local_update(protocol: Protocol, task: Task, defense, images: torch.Tensor, labels: torch.Tensor,
                 params: Params, generator: torch.Generator, shuffle: tuple[int, ...] = (0, 0, 0)) -> Params:
    """The update a client sends: a gradient (FedSGD) or a weight delta (FedAvg). `shuffle`
    seeds the batch order of local epochs (the client's data seed, round and id)."""
    if protocol.name == "fedsgd":
        return defense.transform_update(defense.gradient(task, params, images, labels, generator), generator)
    if protocol.uses_epochs:
        batches = list(_epoch_batches(protocol, len(labels), shuffle))
    else:
        batches = [torch.arange(len(labels))] * protocol.local_steps
    weights = {n: p.detach().clone() for n, p in params.items()}
    for idx in batches:
        grads = defense.gradient(task, weights, images[idx], labels[idx], generator)
        weights = {n: w - protocol.lr * grads[n] for n, w in weights.items()}
    delta = {n: weights[n] - params[n] for n in params}
    return defense.transform_update(delta, generator)


@torch.no_grad()
def accuracy(task: Task, params: Params, images: torch.Tensor, labels: torch.Tensor,
             batch: int = 256) -> dict[str, float]:
    """Accuracy and mean loss of the given trainable parameters on a labelled set."""
    correct, loss = 0, 0.0
    for start in range(0, len(labels), batch):
        x, y = images[start:start + batch].to(task.device), labels[start:start + batch].to(task.device)
        logits = task.logits(params, x)
        correct += int((logits.argmax(1) == y).sum())
        loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
    return {"accuracy": correct / len(labels), "loss": loss / len(labels)}
