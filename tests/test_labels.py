"""Label recovery strategies: each recovers what its paper says it recovers, where its
assumptions hold, and refuses clearly where it cannot run."""

import json

import numpy as np
import pytest
import torch
from torch import nn

from attacks.labels import (
    STRATEGIES,
    LabelStrategyError,
    gradinversion,
    idlg,
    ilrg,
    ilrg_counts,
    last_linear_layer,
    llg,
    recover_labels,
)
from fedsim.config import RunConfig
from fedsim.data import federated_data
from fedsim.evaluate import label_accuracy
from fedsim.flower import client_update
from fedsim.models import build_task, model_spec
from fedsim.observation import Observation
from fedsim.task import Task


class Setting:
    """An untrained model, its private pool, and observations of chosen images."""

    def __init__(self, **overrides):
        self.cfg = RunConfig(peft="full", pretrained="none", **overrides)
        data = federated_data(self.cfg)
        self.spec = model_spec(self.cfg, data.private.class_names)
        self.task = build_task(self.spec)
        self.params = self.task.trainable()
        self.images, self.labels = data.private.images, data.private.labels
        self.classes = self.task.num_classes
        self.by_class = [np.flatnonzero(self.labels.numpy() == c) for c in range(self.classes)]

    def pick(self, labels, rng):
        """One distinct image per wanted label."""
        idx = []
        for c in labels:
            idx.append(int(rng.choice(np.setdiff1d(self.by_class[c], idx))))
        return np.array(idx)

    def observe(self, idx) -> Observation:
        grads = self.task.gradients(self.params, self.images[idx], self.labels[idx])
        return Observation(1, 0, "gradient", grads, self.params, len(idx), 0.1, 1, self.spec)


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny products: more threads only contend


@pytest.fixture(scope="module")
def lenet():
    return Setting(model="lenet")


@pytest.fixture(scope="module")
def convnet():
    return Setting(model="convnet")


@pytest.fixture(scope="module")
def lenet_faces():
    return Setting(model="lenet", dataset="faces")


def clip_task(peft):
    cfg = RunConfig(pretrained="none", peft=peft)
    data = federated_data(cfg)
    spec = model_spec(cfg, data.private.class_names)
    return cfg, data, spec, build_task(spec)


def test_idlg_recovers_every_batch1_label_on_lenet(lenet):
    rng = np.random.default_rng(0)
    for i in rng.choice(len(lenet.labels), size=40, replace=False):
        assert idlg(lenet.observe(np.array([i])), lenet.task).tolist() == [int(lenet.labels[i])]


def test_idlg_through_the_client_code_fedsgd_and_one_step_fedavg(tmp_path):
    for protocol in ("fedsgd", "fedavg"):
        cfg = RunConfig(clients=4, model="lenet", peft="full", pretrained="none", protocol=protocol,
                        out=str(tmp_path / protocol))
        data = federated_data(cfg)
        spec = model_spec(cfg, data.private.class_names)
        task = build_task(spec)
        kind = "gradient" if protocol == "fedsgd" else "delta"
        for client in range(4):
            update, n = client_update(json.dumps(cfg.to_dict(), sort_keys=True), client, 1, task.trainable())
            obs = Observation(1, client, kind, update, task.trainable(), n, cfg.lr, 1, spec)
            assert recover_labels("idlg", obs, task).tolist() == data.client_batch(cfg, 1, client)[1].tolist()


def test_gradinversion_recovers_distinct_labels(lenet, convnet):
    """Exact where the true class dominates its gradient row: ConvNet at batch 8; LeNet, whose
    uniform(-0.5, 0.5) classifier puts up to ~25 % probability on some classes, only at small
    batches (see the README's Label recovery section)."""
    rng = np.random.default_rng(1)
    for setting, batch in ((convnet, 8), (lenet, 2), (lenet, 4)):
        for _ in range(10):
            idx = setting.pick(rng.choice(setting.classes, size=batch, replace=False), rng)
            pred = gradinversion(setting.observe(idx), setting.task)
            assert len(set(pred.tolist())) == batch
            assert label_accuracy(pred, setting.labels[idx]) == 1.0


@pytest.mark.parametrize("labels", [[3, 3, 3, 7, 7, 1], [5, 5, 5, 5, 5, 5], [0, 2, 2, 9, 9, 9]])
def test_ilrg_recovers_exact_counts_with_repeated_labels(convnet, labels):
    idx = convnet.pick(labels, np.random.default_rng(2))
    counts, _ = ilrg_counts(convnet.observe(idx), convnet.task)
    assert counts.tolist() == torch.bincount(torch.tensor(labels), minlength=10).tolist()
    assert sorted(ilrg(convnet.observe(idx), convnet.task).tolist()) == sorted(labels)


def test_ilrg_counts_on_lenet_faces_random_batches(lenet_faces):
    rng = np.random.default_rng(3)
    for _ in range(10):
        idx = lenet_faces.pick(rng.integers(2, size=8), rng)
        assert sorted(ilrg(lenet_faces.observe(idx), lenet_faces.task).tolist()) == \
            sorted(lenet_faces.labels[idx].tolist())


@pytest.mark.parametrize("strategy", ["llg", "ilrg"])
@pytest.mark.parametrize("batch", [1, 5, 16, 23])
def test_repeated_label_strategies_give_exactly_b_labels(lenet, strategy, batch):
    rng = np.random.default_rng(batch)
    idx = lenet.pick(rng.integers(lenet.classes, size=batch), rng)
    pred = STRATEGIES[strategy](lenet.observe(idx), lenet.task)
    assert pred.dtype == torch.long and pred.shape == (batch,)
    assert pred.min() >= 0 and pred.max() < lenet.classes


def test_llg_gives_b_labels_from_a_noisy_update(lenet):
    """More negative row sums than the batch size (noise) still gives exactly B labels."""
    idx = np.arange(3)
    obs = lenet.observe(idx)
    noisy = {n: g + torch.randn_like(g) for n, g in obs.update.items()}
    obs = Observation(1, 0, "gradient", noisy, obs.global_params, 3, 0.1, 1, obs.model_spec)
    assert llg(obs, lenet.task).shape == (3,)


def test_idlg_is_a_batch1_rule(lenet):
    with pytest.raises(LabelStrategyError, match="batch-1 rule.*2 examples"):
        idlg(lenet.observe(np.arange(2)), lenet.task)


def test_gradinversion_refuses_more_examples_than_classes(lenet_faces):
    with pytest.raises(LabelStrategyError, match="distinct labels; batch size 3 exceeds the 2 classes"):
        gradinversion(lenet_faces.observe(np.arange(3)), lenet_faces.task)


def test_every_strategy_refuses_coop():
    cfg, data, spec, task = clip_task("coop")
    update, n = client_update(json.dumps(cfg.to_dict(), sort_keys=True), 0, 1, task.trainable())
    obs = Observation(1, 0, "gradient", update, task.trainable(), n, cfg.lr, 1, spec)
    for name in STRATEGIES:
        with pytest.raises(LabelStrategyError) as info:
            recover_labels(name, obs, task)
        message = str(info.value)
        assert "trainable last linear layer" in message and "prompt.ctx" in message and "MIP" in message


def test_linear_probe_head_is_the_classifier():
    cfg, data, spec, task = clip_task("linear-probe")
    layer = last_linear_layer(task)
    assert (layer.weight, layer.bias) == ("head.weight", "head.bias")
    images, labels = data.private.images[:6], data.private.labels[:6]
    obs = Observation(1, 0, "gradient", task.gradients(task.trainable(), images, labels), task.trainable(), 6,
                      0.1, 1, spec)
    assert ilrg(obs, task).shape == (6,)


class Scaled(nn.Module):
    """A linear layer with num_classes outputs that is not the output (an auxiliary head
    registered last), and a classifier whose output is rescaled when `scale` is set."""

    def __init__(self, scale: float | None):
        super().__init__()
        self.body = nn.Flatten()
        self.fc = nn.Linear(3 * 4 * 4, 5)
        self.aux = nn.Linear(3 * 4 * 4, 5)
        self.scale = scale

    def forward(self, x):
        h = self.body(x)
        self.aux(h)
        return self.fc(h) * self.scale if self.scale else self.fc(h)


def test_only_a_layer_whose_output_is_the_logits_is_taken():
    assert last_linear_layer(Task(Scaled(None), 5, (3, 4, 4))).weight == "fc.weight"
    with pytest.raises(LabelStrategyError, match="needs a trainable last linear layer"):
        last_linear_layer(Task(Scaled(2.0), 5, (3, 4, 4)))


def test_ilrg_needs_a_bias():
    task = Task(nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5, bias=False)), 5, (3, 4, 4))
    images, labels = torch.rand(2, 3, 4, 4), torch.tensor([1, 3])
    obs = Observation(1, 0, "gradient", task.gradients(task.trainable(), images, labels), task.trainable(), 2,
                      0.1, 1, {})
    with pytest.raises(LabelStrategyError, match="needs the gradient of the last layer's bias"):
        ilrg(obs, task)


def test_unknown_strategy_names_the_valid_ones(lenet):
    with pytest.raises(LabelStrategyError, match="unknown label strategy 'dlg'; valid: idlg, gradinversion, llg, ilrg"):
        recover_labels("dlg", lenet.observe(np.arange(1)), lenet.task)
