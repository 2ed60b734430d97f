"""Properties of the defense suite: each defense does what its docstring says, on any input."""

import math

import pytest
import torch
from opacus.accountants import RDPAccountant

from defenses.base import update_norm
from defenses.dp import DPSGD
from defenses.soteria import Soteria, representation_layer
from defenses.update import Prune, Quantize, UpdateDP
from fedsim.accounting import Accounting, epsilon
from fedsim.api import Chain
from fedsim.config import ConfigError, RunConfig
from fedsim.plugins import make_defense
from fedsim.protocol import Protocol
from fedsim.training import local_update


def random_update(seed=0, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return {"conv.weight": scale * torch.randn(6, 3, 5, 5, generator=g), "fc.weight": scale * torch.randn(10, 37,
            generator=g), "fc.bias": scale * torch.randn(10, generator=g)}


@pytest.mark.parametrize("ratio", [0.0, 0.2, 0.5, 0.9, 0.99])
def test_pruning_zeroes_exactly_the_requested_share_of_each_tensor_smallest_first(ratio):
    update = random_update(int(ratio * 100))
    pruned = Prune(ratio).transform_update(update, torch.Generator())
    for name, u in update.items():
        kept = pruned[name] != 0
        assert int(kept.sum()) == u.numel() - round(ratio * u.numel())
        torch.testing.assert_close(pruned[name][kept], u[kept])  # survivors unchanged
        if 0 < kept.sum() < u.numel():
            assert u[kept].abs().min() >= u[~kept].abs().max()  # the largest in magnitude survive


@pytest.mark.parametrize("clip", [0.1, 1.0, 30.0])
def test_dp_update_bounds_the_update_norm(clip):
    for seed, scale in ((0, 0.001), (1, 1.0), (2, 100.0)):
        update = random_update(seed, scale)
        out = UpdateDP(clip=clip, noise=0.0).transform_update(update, torch.Generator())
        norm = float(update_norm(out))
        assert norm <= clip * (1 + 1e-5)
        if float(update_norm(update)) <= clip:  # an update inside the ball is left as it is
            torch.testing.assert_close(out, update)


def test_dp_update_noise_std_is_sigma_times_clip():
    update = {"w": torch.zeros(20_000)}
    out = UpdateDP(clip=0.5, noise=3.0).transform_update(update, torch.Generator().manual_seed(1))["w"]
    assert abs(out.std().item() - 1.5) < 0.03  # 20,000 draws: std error of the std ~0.5 %
    assert abs(out.mean().item()) < 0.05


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
@pytest.mark.parametrize("mode", ["deterministic", "stochastic"])
def test_quantisation_produces_only_the_allowed_levels(bits, mode):
    update = random_update(bits)
    out = Quantize(bits, mode).transform_update(update, torch.Generator().manual_seed(0))
    for name, u in update.items():
        levels = torch.linspace(u.min().item(), u.max().item(), 2 ** bits)
        distance = (out[name].flatten()[:, None] - levels[None]).abs().min(1).values
        assert distance.max() < 1e-5 * (u.max() - u.min())
        assert len(out[name].unique()) <= 2 ** bits
        assert out[name].shape == u.shape
    if mode == "deterministic":  # nearest level: never more than half a step away
        step = (update["fc.weight"].max() - update["fc.weight"].min()) / (2 ** bits - 1)
        assert (out["fc.weight"] - update["fc.weight"]).abs().max() <= step / 2 + 1e-6


def test_stochastic_quantisation_is_unbiased_and_deterministic_is_not():
    u = {"w": torch.linspace(-1, 1, 50) ** 3}
    q = Quantize(2, "stochastic")
    g = torch.Generator().manual_seed(0)
    mean = torch.stack([q.transform_update(u, g)["w"] for _ in range(4000)]).mean(0)
    step = 2 / 3
    # the std of one draw is at most step/2, so of the mean of 4000 at most 0.0053
    assert (mean - u["w"]).abs().max() < 0.025
    biased = Quantize(2, "deterministic").transform_update(u, g)["w"]
    assert (biased - u["w"]).abs().max() > 0.1 * step


def test_epsilon_grows_with_rounds_and_shrinks_with_sigma():
    acc = [Accounting(rounds=r, sample_rate=0.05, steps_per_round=1, same_batch=True) for r in (1, 10, 100)]
    eps = [a.example_epsilon(1.0, 1e-5) for a in acc]
    assert eps[0] < eps[1] < eps[2]
    by_sigma = [acc[1].example_epsilon(s, 1e-5) for s in (0.7, 1.0, 2.0, 4.0)]
    assert all(a > b for a, b in zip(by_sigma, by_sigma[1:]))
    assert acc[1].example_epsilon(0.0, 1e-5) == math.inf and acc[0].client_epsilon(1.0, 1e-5) > 0
    assert Accounting(0, 0.05, 1, True).example_epsilon(1.0, 1e-5) == 0.0


def test_epsilon_is_opacus_rdp_accountant():
    cfg = RunConfig(batch_size=4, defense="dp", dp_noise=1.3, dp_delta=1e-4)
    a = Accounting.of(Protocol.of(cfg), client_sizes=[120, 80, 200], rounds=30)
    assert a.sample_rate == 4 / 80  # the smallest client is the worst case
    direct = RDPAccountant()
    for _ in range(30):
        direct.step(noise_multiplier=1.3, sample_rate=4 / 80)
    assert a.example_epsilon(1.3, 1e-4) == pytest.approx(direct.get_epsilon(1e-4), rel=1e-9)
    assert make_defense(cfg).privacy(a) == {"epsilon": a.example_epsilon(1.3, 1e-4), "delta": 1e-4}


def test_k_local_steps_on_one_batch_compose_to_one_gaussian_of_sigma_over_root_k():
    # without subsampling the identity is exact: k Gaussian steps of sigma = one of sigma/sqrt(k)
    cfg = RunConfig(protocol="fedavg", local_steps=4, batch_size=50)
    a = Accounting.of(Protocol.of(cfg), client_sizes=[50], rounds=5)
    assert (a.steps_per_round, a.same_batch, a.sample_rate) == (4, True, 1.0)
    direct = RDPAccountant()
    direct.history = [(1.0, 1.0, 20)]
    assert a.example_epsilon(1.0, 1e-5) == pytest.approx(direct.get_epsilon(1e-5), rel=1e-6)
    epochs = Accounting.of(Protocol.of(RunConfig(protocol="fedavg", local_epochs=2, batch_size=8)), [30], rounds=3)
    assert (epochs.steps_per_round, epochs.same_batch) == (8, False)
    assert epochs.example_epsilon(1.0, 1e-5) == pytest.approx(epsilon(1.0, 8 / 30, 24, 1e-5))


def test_chain_applies_in_the_listed_order():
    update = random_update(3)
    prune, quantize = Prune(0.5), Quantize(2, "deterministic")
    g = torch.Generator()
    pq = Chain([prune, quantize]).transform_update(update, g)
    qp = Chain([quantize, prune]).transform_update(update, g)
    torch.testing.assert_close(pq, quantize.transform_update(prune.transform_update(update, g), g))
    torch.testing.assert_close(qp, prune.transform_update(quantize.transform_update(update, g), g))
    assert any(not torch.equal(pq[n], qp[n]) for n in update)
    assert int((qp["fc.weight"] != 0).sum()) == 185  # pruning last: exactly half of 370 survive


def test_a_chain_holds_one_way_of_computing_the_gradient():
    with pytest.raises(ValueError, match="only one"):
        Chain([DPSGD(), DPSGD(noise=2.0)])


def test_make_defense_builds_the_configured_chain():
    chain = make_defense(RunConfig(defense="dp, prune,quantize", prune_ratio=0.3, quantize_bits=3))
    assert [d.name for d in chain.defenses] == ["dp", "prune", "quantize"]
    assert chain.defenses[1].ratio == 0.3 and chain.defenses[2].bits == 3
    assert make_defense(RunConfig(defense="none")).defenses == []


@pytest.mark.parametrize("defense,message", [
    ("dp,nope", "'nope' is not valid"),
    ("dp,,prune", "'' is not valid"),
    ("none,dp", "none cannot be chained"),
    ("prune,prune", "names prune more than once"),
])
def test_bad_chains_are_refused_naming_the_value_and_the_valid_ones(defense, message):
    with pytest.raises(ConfigError) as err:
        RunConfig(defense=defense).validate()
    assert message in str(err.value)
    if "not valid" in message:
        assert "dp-update" in str(err.value) and "soteria" in str(err.value)


@pytest.mark.parametrize("defense,field,value", [("prune", "prune_ratio", 1.0), ("quantize", "quantize_bits", 0),
                                                 ("dp", "dp_delta", 0.0), ("quantize", "quantize_mode", "random"),
                                                 ("dp-update", "update_clip", 0.0)])
def test_bad_defense_parameters_are_refused(defense, field, value):
    with pytest.raises(ConfigError, match=field.replace("_", "-")):
        RunConfig(defense=defense, **{field: value}).validate()


@pytest.mark.parametrize("protocol", ["fedsgd", "fedavg"])
@pytest.mark.parametrize("defense", ["dp", "dp-update", "flower-dp", "prune", "quantize", "soteria", "secagg",
                                     "dp,soteria,prune,quantize"])
def test_every_defense_keeps_the_update_names_and_shapes(lenet_setup, defense, protocol):
    cfg, data, task = lenet_setup
    cfg.protocol, cfg.defense, cfg.batch_size, cfg.local_steps = protocol, defense, 2, 2
    images, labels = data.client_batch(cfg, 1, 0)
    params = task.trainable()
    plain = local_update(Protocol.of(cfg), task, make_defense(RunConfig(protocol=protocol, local_steps=2)), images,
                         labels, params, torch.Generator().manual_seed(0))
    out = local_update(Protocol.of(cfg), task, make_defense(cfg), images, labels, params,
                       torch.Generator().manual_seed(0))
    assert list(out) == list(plain)
    assert all(out[n].shape == plain[n].shape and out[n].dtype == plain[n].dtype for n in plain)
    assert all(torch.isfinite(out[n]).all() for n in out)


def test_soteria_masks_exactly_the_requested_units_of_the_representation_layer(lenet_setup):
    cfg, data, task = lenet_setup
    images, labels = data.client_batch(RunConfig(batch_size=3), 1, 0)
    params = task.trainable()
    plain = task.gradients(params, images, labels)
    out = Chain([Soteria(0.75)]).gradient(task, params, images, labels, torch.Generator())
    assert representation_layer(task) == "fc"
    units = plain["fc.weight"].shape[1]
    masked = (out["fc.weight"] == 0).all(0) & (plain["fc.weight"] != 0).any(0)
    assert int(masked.sum()) == round(0.75 * units)
    kept = ~(out["fc.weight"] == 0).all(0)
    torch.testing.assert_close(out["fc.weight"][:, kept], plain["fc.weight"][:, kept])
    for name in plain:
        if name != "fc.weight":
            torch.testing.assert_close(out[name], plain[name])


def test_soteria_refuses_a_model_without_a_representation_layer(clip_setup):
    cfg, data, task = clip_setup  # tiny CLIP with CoOp: only the text prompt trains
    with pytest.raises(ValueError, match="adapter, double-adapter or linear-probe"):
        representation_layer(task)


def test_weights_round_trip_for_flower_mods():
    params, update = random_update(4), random_update(5)
    for protocol in ("fedsgd", "fedavg"):
        rule = Protocol(name=protocol, lr=0.1)
        back = rule.from_weights(rule.as_weights(update, params), params)
        torch.testing.assert_close(back, update, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("peft,layer", [("adapter", "image_adapter.fc1")])  # linear-probe's head: same code path
def test_soteria_on_clip_masks_the_layer_fed_by_the_image_embedding(peft, layer):
    from fedsim.data import federated_data
    from fedsim.models import build_task, model_spec

    cfg = RunConfig(clients=3, peft=peft, batch_size=2)
    data = federated_data(cfg)
    task = build_task(model_spec(cfg, data.private.class_names))
    assert representation_layer(task) == layer
    images, labels = data.client_batch(cfg, 1, 0)
    out = Chain([Soteria(0.5)]).gradient(task, task.trainable(), images, labels, torch.Generator())
    units = out[f"{layer}.weight"].shape[1]
    assert int((out[f"{layer}.weight"] == 0).all(0).sum()) >= round(0.5 * units)


def test_soteria_scores_of_a_batch_are_the_sum_of_each_example_s(lenet_setup):
    from defenses.soteria import unit_scores

    cfg, data, task = lenet_setup
    images, _ = data.client_batch(RunConfig(batch_size=3), 1, 0)
    params = task.trainable()
    batch = unit_scores(task, params, images, "fc")
    each = sum(unit_scores(task, params, x.unsqueeze(0), "fc") for x in images)
    torch.testing.assert_close(batch, each, rtol=1e-4, atol=1e-6)
