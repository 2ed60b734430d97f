import torch

from fedsim.models.peft import CoOp


def test_coop_context_is_the_only_trainable_parameter(clip_setup):
    _, _, task = clip_setup
    assert isinstance(task.model, CoOp)
    assert task.names == ["prompt.ctx"]
    assert task.trainable()["prompt.ctx"].shape == (4, 64)


def test_gradients_match_plain_autograd(lenet_setup):
    cfg, data, task = lenet_setup
    images, labels = data.client_batch(cfg, 1, 0)
    grads = task.gradients(task.trainable(), images, labels)
    task.model.zero_grad()
    torch.nn.functional.cross_entropy(task.model(images), labels).backward()
    for name, p in task.model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad)


def test_soft_one_hot_targets_give_the_hard_label_gradient(clip_setup):
    cfg, data, task = clip_setup
    images, labels = data.client_batch(cfg, 1, 1)
    params = task.trainable()
    hard = task.gradients(params, images, labels)
    soft = task.gradients(params, images, torch.nn.functional.one_hot(labels, 10).float())
    torch.testing.assert_close(hard["prompt.ctx"], soft["prompt.ctx"])


def test_per_example_gradients_average_to_the_batch_gradient(clip_setup):
    cfg, data, task = clip_setup
    cfg.batch_size = 4
    images, labels = data.client_batch(cfg, 1, 2)
    params = task.trainable()
    per = task.per_example_gradients(params, images, labels)
    assert per["prompt.ctx"].shape == (4, 4, 64)
    torch.testing.assert_close(per["prompt.ctx"].mean(0), task.gradients(params, images, labels)["prompt.ctx"],
                               rtol=1e-4, atol=1e-5)


def test_gradients_are_differentiable_for_matching(clip_setup):
    cfg, data, task = clip_setup
    images, labels = data.client_batch(cfg, 1, 0)
    dummy = torch.rand_like(images, requires_grad=True)
    g = task.gradients(task.trainable(), dummy, labels, create_graph=True)
    (g["prompt.ctx"] ** 2).sum().backward()
    assert dummy.grad is not None and dummy.grad.abs().sum() > 0
