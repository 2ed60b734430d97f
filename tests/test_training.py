import json

import torch

from fedsim.api import Defense
from fedsim.config import RunConfig
from fedsim.data import federated_data
from fedsim.flower import client_update
from fedsim.models import build_task, model_spec
from fedsim.observation import Observation
from fedsim.protocol import Protocol
from fedsim.training import accuracy, client_examples, local_update


def setup(**kw):
    cfg = RunConfig(clients=4, batch_size=4, pretrained="none", **kw)
    data = federated_data(cfg)
    return cfg, data, build_task(model_spec(cfg, data.private.class_names))


def test_fedavg_one_step_pseudo_gradient_equals_the_fedsgd_gradient():
    for peft in ("coop", "adapter"):
        cfg, data, task = setup(peft=peft, protocol="fedavg", local_steps=1, lr=0.05)
        params = task.trainable()
        grad, _ = client_update(json.dumps({**cfg.to_dict(), "protocol": "fedsgd"}), 1, 1, params)
        delta, n = client_update(json.dumps(cfg.to_dict()), 1, 1, params)
        obs = Observation(1, 1, "delta", delta, params, n, cfg.lr, Protocol.of(cfg).steps_behind(n), {})
        for name in grad:
            torch.testing.assert_close(obs.gradient()[name], grad[name], atol=1e-5, rtol=1e-4)


def test_local_steps_move_further_than_one_step():
    cfg, data, task = setup(protocol="fedavg", local_steps=5, lr=0.001)
    images, labels = data.client_batch(cfg, 1, 0)
    gen = torch.Generator().manual_seed(0)
    params = task.trainable()
    five = local_update(Protocol.of(cfg), task, Defense(), images, labels, params, gen)
    cfg.local_steps = 1
    one = local_update(Protocol.of(cfg), task, Defense(), images, labels, params, gen)
    assert five["prompt.ctx"].norm() > 3 * one["prompt.ctx"].norm()  # small steps add up


def test_local_epochs_cover_all_the_client_data():
    cfg, data, task = setup(protocol="fedavg", local_epochs=2)
    images, labels = client_examples(cfg, data, 1, 2)
    assert len(labels) == len(data.client_indices[2])
    assert Protocol.of(cfg).steps_behind(len(labels)) == 2 * -(-len(labels) // cfg.batch_size)


def test_accuracy_of_a_model_that_always_answers_one_class():
    cfg, data, task = setup(model="lenet", peft="full")
    params = task.trainable()
    params["fc.weight"] = torch.zeros_like(params["fc.weight"])
    params["fc.bias"] = torch.nn.functional.one_hot(torch.tensor(3), 10).float() * 10
    labels = data.public.labels
    result = accuracy(task, params, data.public.images, labels)
    assert result["accuracy"] == (labels == 3).sum().item() / len(labels)
