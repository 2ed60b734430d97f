"""The classic optimisation attacks (iDLG, Inverting Gradients, GradInversion) and their parts."""

import json

import pytest
import torch
from torch import nn

from attacks import gradinversion as gi_module
from attacks.gradinversion import GradInversion, best_shift, consensus
from attacks.idlg import IDLG
from attacks.ig import InvertingGradients
from attacks.objectives import cosine_distance
from attacks.optim import UNIT_BOX, adam_loop, lr_factor, per_restart, to_pixels
from attacks.priors import BatchNormStatistics, l2_prior, total_variation
from fedsim.config import RunConfig
from fedsim.data import federated_data
from fedsim.evaluate import evaluate
from fedsim.flower import client_update
from fedsim.models import build_task, model_spec
from fedsim.observation import Observation


@pytest.fixture
def labels_module(monkeypatch):
    """Counts the label strategies the attacks call (by name), running the real ones."""
    import attacks.labels as labels

    calls = []
    real = labels.recover_labels
    monkeypatch.setattr(labels, "recover_labels", lambda name, obs, task: calls.append(name) or real(name, obs, task))
    return calls


def setup(model, size=16, batch_size=1, clients=2, dataset="digits"):
    cfg = RunConfig(clients=clients, model=model, peft="full", image_size=size, batch_size=batch_size,
                    dataset=dataset)
    data = federated_data(cfg)
    spec = model_spec(cfg, data.private.class_names)
    return cfg, data, build_task(spec), spec


def observe(cfg, data, task, spec, client):
    update, n = client_update(json.dumps(cfg.to_dict(), sort_keys=True), client, 1, task.trainable())
    obs = Observation(1, client, "gradient", update, task.trainable(), n, cfg.lr, 1, spec)
    return obs, *data.client_batch(cfg, 1, client)


# ------------------------------------------------------------------------------ parts


def test_cosine_distance_is_zero_for_identical_and_ignores_scale():
    g = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    h = {"a": torch.randn(3, 4), "b": torch.randn(5)}
    assert abs(float(cosine_distance(g, g))) < 1e-6
    scaled = {n: 3.7 * t for n, t in h.items()}
    torch.testing.assert_close(cosine_distance(scaled, g), cosine_distance(h, g))
    assert float(cosine_distance({n: -t for n, t in g.items()}, g)) == pytest.approx(2.0)


def test_total_variation_and_l2_prior():
    assert float(total_variation(torch.full((2, 3, 8, 8), 0.3))) == 0.0
    ramp = torch.arange(4.0).repeat(1, 1, 4, 1)  # [1, 1, 4, 4], +1 per column, constant down
    assert float(total_variation(ramp)) == pytest.approx(1.0)
    assert float(l2_prior(torch.full((1, 3, 2, 2), 0.5), center=0.5)) == 0.0


def test_batchnorm_statistics_match_a_manual_computation():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5))
    for bn in (net[1], net[4]):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    net.eval()
    x = torch.randn(2, 3, 9, 9)

    def manual(inp, bn):
        mean, var = inp.mean((0, 2, 3)), inp.var((0, 2, 3), unbiased=False)
        return (mean - bn.running_mean).norm() + (var - bn.running_var).norm()

    a = net[0](x)
    b = net[3](net[2](net[1](a)))
    expected = 10 * manual(a, net[1]) + manual(b, net[4])
    with BatchNormStatistics(net, first_multiplier=10) as stats:
        net(x)
        torch.testing.assert_close(stats.loss(), expected)
        # inside vmap, over a leading "restart" dimension, each restart gets its own term
        xs = torch.stack([x, 2 * x])

        def one(xr):
            net(xr)
            return stats.loss()

        per = per_restart(one, xs)
    torch.testing.assert_close(per[0], expected)
    assert not net[1]._forward_hooks and not net[4]._forward_hooks  # removed on exit


def test_adam_loop_keeps_images_boxed_and_follows_the_schedule():
    images = torch.full((2, 1, 3, 4, 4), 0.5, requires_grad=True)
    goal = torch.tensor([2.0, -1.0]).view(2, 1, 1, 1, 1)  # outside the box on both sides
    seen = []
    losses = adam_loop(lambda it: ((images - goal) ** 2).flatten(1).mean(1), images, 40, 0.1, langevin=0.05,
                       generator=torch.Generator().manual_seed(0), progress=lambda d, t: seen.append(d))
    assert losses.shape == (2,) and seen[-1] == 40
    assert images.min() >= 0 and images.max() <= 1
    assert float(images[0].detach().min()) == 1.0 and float(images[1].detach().max()) == 0.0  # pushed against the box
    assert [lr_factor("step", i, 80) for i in (0, 29, 30, 50, 70)] == pytest.approx([1, 1, 0.1, 0.01, 0.001])
    assert lr_factor("cosine", 0, 100, warmup=10) == pytest.approx(0.1)


def test_batched_gradients_equal_one_restart_at_a_time(lenet_setup):
    cfg, data, task = lenet_setup
    params = task.trainable()
    images = torch.rand(3, 2, *task.image_shape)
    labels = torch.randint(0, 10, (3, 2))
    batched = task.batched_gradients(params, images, labels)
    for r in range(3):
        alone = task.gradients(params, images[r], labels[r])
        for name in alone:
            torch.testing.assert_close(batched[name][r], alone[name], rtol=1e-4, atol=1e-6)


def test_registration_undoes_a_translation():
    torch.manual_seed(0)
    image = torch.rand(3, 16, 16)
    assert best_shift(torch.roll(image, (2, -3), dims=(-2, -1)), image, 4) == (-2, 3)
    # three seeds holding the same batch, shifted and reordered: the consensus is the reference
    batch = torch.rand(2, 3, 16, 16)
    seeds = torch.stack([batch, torch.roll(batch, 1, dims=-1), torch.roll(batch, -2, dims=-2)[[1, 0]]])
    mean, targets = consensus(seeds, 0, 3)
    torch.testing.assert_close(mean, batch)
    torch.testing.assert_close(targets, seeds)


# ------------------------------------------------------------------------------ attacks


def test_vectorised_restarts_match_restarts_run_alone(labels_module):
    cfg, data, task, spec = setup("lenet")
    obs, _, _ = observe(cfg, data, task, spec, 0)
    vectorised = InvertingGradients(iterations=5, restarts=3, seed=3).reconstruct(obs, task)
    task.model.supports_vmap = False  # the per-restart Python loop
    alone = InvertingGradients(iterations=5, restarts=3, seed=3).reconstruct(obs, task)
    assert vectorised.extras["restart_losses"] == pytest.approx(alone.extras["restart_losses"], rel=1e-3)
    torch.testing.assert_close(vectorised.images, alone.images, atol=1e-3, rtol=0)


def test_inverting_gradients_beats_a_grey_image(labels_module):
    cfg, data, task, spec = setup("lenet")
    obs, images, labels = observe(cfg, data, task, spec, 1)
    recon = InvertingGradients(iterations=300).reconstruct(obs, task)
    psnr = evaluate(recon.images, recon.labels, images, labels)[0]["psnr"]
    grey = evaluate(torch.full_like(images, 0.5), labels, images, labels)[0]["psnr"]
    assert psnr > grey + 5, (psnr, grey)  # measured: 16.7 vs 9.4 dB
    assert labels_module == ["idlg"] and recon.extras["label_source"] == "idlg"
    assert torch.equal(recon.labels, labels)


def test_idlg_recovers_lenet_digits_with_the_label_fixed(labels_module):
    cfg, data, task, spec = setup("lenet", clients=3)
    for client in (0, 1, 2):
        obs, images, labels = observe(cfg, data, task, spec, client)
        recon = IDLG(iterations=8).reconstruct(obs, task)  # 16 px: 35-50 dB at 10
        metrics = evaluate(recon.images, recon.labels, images, labels)[0]
        assert metrics["psnr"] > 20 and metrics["label_acc"] == 1.0, metrics
    assert labels_module == ["idlg"] * 3 and recon.extras["label_source"] == "idlg"


def test_gradinversion_runs_on_resnet18_with_the_bn_prior(labels_module, monkeypatch):
    cfg, data, task, spec = setup("resnet18", size=16, batch_size=2)
    obs, images, labels = observe(cfg, data, task, spec, 0)
    entered = []
    original = BatchNormStatistics.__enter__
    monkeypatch.setattr(BatchNormStatistics, "__enter__", lambda self: entered.append(1) or original(self))
    recon = GradInversion(iterations=4, restarts=2, group_every=2).reconstruct(obs, task)
    assert recon.images.shape == images.shape and recon.labels.shape == (2,)
    assert 0 <= float(recon.images.min()) and float(recon.images.max()) <= 1
    assert recon.extras["bn_prior"] and entered == [1] and labels_module == ["gradinversion"]
    assert not any(m._forward_hooks for m in task.model.modules())
    off = GradInversion(iterations=1, restarts=2, bn_prior=False).reconstruct(obs, task)
    assert not off.extras["bn_prior"] and entered == [1]  # hooks never installed


def test_gradinversion_switches_switch(labels_module, monkeypatch):
    cfg, data, task, spec = setup("lenet", batch_size=2)
    obs, _, _ = observe(cfg, data, task, spec, 0)
    calls = {"tv": 0, "consensus": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(gi_module, "total_variation", counting("tv", gi_module.total_variation))
    monkeypatch.setattr(gi_module, "consensus", counting("consensus", gi_module.consensus))
    run = lambda **kw: GradInversion(iterations=4, restarts=2, group_every=2, **kw).reconstruct(obs, task)  # noqa: E731
    full = run()
    assert calls["tv"] > 0 and calls["consensus"] == 3 and labels_module == ["gradinversion"]
    assert not full.extras["bn_prior"]  # LeNet has no BatchNorm
    calls.update(tv=0, consensus=0)
    plain = run(fidelity=False, group_consistency=False, langevin=False, label_strategy=None)
    assert calls == {"tv": 0, "consensus": 0} and labels_module == ["gradinversion"]
    assert plain.extras["label_source"] == "optimised"
    quiet = run(langevin=False)
    noisy = run(langevin=True)
    assert not torch.equal(quiet.images, noisy.images)


def test_to_pixels_maps_the_unit_box_to_zero_one():
    assert [float(to_pixels(torch.tensor(v))) for v in UNIT_BOX] == [0.0, 1.0]
