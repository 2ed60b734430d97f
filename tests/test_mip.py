"""MIP: embeddings and labels from PEFT gradients, learned priors, the attack end to end."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import grad, jacfwd

from attacks.decoders import RidgeDecoder, learned_prior, shifted
from attacks.embeddings import TextJacobian, flat_update, head_side, text_side
from attacks.label_search import (
    aligned_starts,
    candidate_label_sets,
    count_label_sets,
    fit_label_sets,
    induced_residual,
    matched_starts,
    successive_halving,
)
from attacks.mip import MIP, route_of
from fedsim.api import Defense
from fedsim.config import ConfigError, RunConfig
from fedsim.data import federated_data
from fedsim.knowledge import AttackerKnowledge
from fedsim.models import build_task, model_spec
from fedsim.observation import Observation
from fedsim.plugins import make_attack
from fedsim.protocol import Protocol
from fedsim.training import local_update


def setup(peft, batch_size=1, **kw):
    cfg = RunConfig(peft=peft, batch_size=batch_size, clients=3, **kw)
    data = federated_data(cfg)
    spec = model_spec(cfg, data.private.class_names)
    return cfg, data, spec, build_task(spec)


def observe(cfg, spec, task, images, labels):
    params = task.trainable()
    update = local_update(Protocol.of(cfg), task, Defense(), images, labels, params, torch.Generator().manual_seed(0))
    return Observation(1, 0, "gradient", update, params, len(labels), cfg.lr, 1, spec)


def mip_attack(cfg):
    return make_attack(cfg, AttackerKnowledge.of(cfg))


def true_embeddings(task, images):
    with torch.no_grad():
        return task.embeddings(task.trainable(), images)


@pytest.mark.parametrize("peft", ["adapter", "double-adapter"])
def test_adapter_gradient_gives_the_embedding_and_label_exactly(peft):
    cfg, data, spec, task = setup(peft)
    for i in (0, 7):
        x, y = data.private.images[i:i + 1], data.private.labels[i:i + 1]
        obs = observe(cfg, spec, task, x, y)
        labels, features, _ = head_side(task, task.trainable(), obs.update, 1, task.model.feature_weight)
        with torch.no_grad():
            z = task.embeddings(task.trainable(), features=features)
        assert labels.tolist() == y.tolist()
        assert F.cosine_similarity(z, true_embeddings(task, x)).item() > 0.9999


@pytest.fixture(scope="module")
def coop_round():
    """A CoOp task on the pre-trained tiny CLIP, its text Jacobian and the public embeddings."""
    cfg, data, spec, task = setup("coop")
    params = task.trainable()
    jac = TextJacobian(task, params, list(params))
    with torch.no_grad():
        public = task.embeddings(params, data.public.images)
    return cfg, data, spec, task, jac, public


def test_coop_gradient_gives_label_and_embedding_through_the_text_jacobian(coop_round):
    cfg, data, spec, task, jac, public = coop_round
    x, y = data.private.images[3:4], data.private.labels[3:4]
    obs = observe(cfg, spec, task, x, y)
    labels, z, info = text_side(task, task.trainable(), obs.update, 1, public, jacobian=jac)
    assert labels.tolist() == y.tolist()
    assert F.cosine_similarity(z, true_embeddings(task, x)).item() > 0.99
    assert info["relative_residual"] < 1e-3


def test_closed_form_residual_and_jacobian_match_the_model(coop_round):
    cfg, data, spec, task, jac, public = coop_round
    obs = observe(cfg, spec, task, data.private.images[:2], data.private.labels[:2])
    g = flat_update(obs.update, list(obs.update))
    scale = task.model.clip.logit_scale.exp().double()
    labels = torch.tensor([[1, 4], [7, 7]])
    Z = 1.3 * public[:4].double().view(2, 2, -1)  # not unit norm: the normalisation is part of it
    r, dr = induced_residual(jac, scale, g, F.one_hot(labels, task.num_classes).double(), Z)

    def through_model(z_flat: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        # The client's loss written through the model's own logits, differentiated by autograd.
        z = F.normalize(z_flat.view(2, -1), dim=-1)
        G = grad(lambda text: F.cross_entropy(task.model.logits_with(z, text), y))(jac.text)
        return jac.apply(G) - g

    for s in range(2):
        assert torch.allclose(r[s], through_model(Z[s].reshape(-1), labels[s]), atol=1e-10)
        assert torch.allclose(dr[s], jacfwd(through_model)(Z[s].reshape(-1), labels[s]), atol=1e-9)


@pytest.mark.parametrize("classes", [(2, 6), (6, 6)])
def test_batch_label_search_finds_the_set_and_separates_it(coop_round, classes):
    cfg, data, spec, task, jac, public = coop_round
    labels = data.private.labels
    idx = [int((labels == c).nonzero()[k]) for k, c in enumerate(classes)]  # two different images
    obs = observe(cfg, spec, task, data.private.images[idx], labels[idx])
    ticks = []
    found, z, info = text_side(task, task.trainable(), obs.update, 2, public, jacobian=jac,
                               public_labels=data.public.labels, progress=lambda done, of: ticks.append(done / of))
    assert sorted(found.tolist()) == list(classes)
    # the pursuit's set, then the two pools: three runs, each counting up to at most its total
    assert all(0 < t <= 1 for t in ticks) and sum(b < a for a, b in zip(ticks, ticks[1:])) == 2
    assert info["label_sets_tried"] == 55  # every pair of labels, repeats included (the pursuit's set is one)
    assert info["fits"] == 1 + 2 * 55  # the pursuit's set, then each pair from two starts
    assert info["runner_up_residual"] > 10 * info["relative_residual"]
    truth = true_embeddings(task, data.private.images[idx])
    cos = F.normalize(z, dim=-1) @ F.normalize(truth, dim=-1).T
    assert cos.max(1).values.min() > 0.99


def test_successive_halving_fits_only_the_best_candidates_further(coop_round):
    cfg, data, spec, task, jac, public = coop_round
    obs = observe(cfg, spec, task, data.private.images[:2], data.private.labels[:2])
    g = flat_update(obs.update, list(obs.update))
    scale = task.model.clip.logit_scale.exp().double()
    sets = candidate_label_sets(task.num_classes, 2, distinct=True)
    starts = public[:2].double().expand(len(sets), 2, -1)
    first, _ = fit_label_sets(jac, scale, g, sets, starts, 2)
    residuals, _ = successive_halving(jac, scale, g, sets, starts, ((2, 3), (5, None)))
    kept = first.argsort()[:3]
    dropped = torch.ones(len(sets), dtype=torch.bool)
    dropped[kept] = False
    assert torch.equal(residuals[dropped], first[dropped])  # fitted once, then left alone
    assert (residuals[kept] < first[kept]).all()


def test_matched_starts_find_the_public_embeddings_that_explain_the_gradient():
    gen = torch.Generator().manual_seed(0)
    atoms = torch.randn(30, 3, 500, dtype=torch.float64, generator=gen)  # near-orthogonal: the exact picks are unique
    sets = torch.tensor([[0, 1, 2], [2, 2, 0]])
    truth = torch.tensor([[4, 17, 9], [9, 21, 4]])
    allowed = torch.ones(30, 3, dtype=torch.bool)
    allowed[17, 0] = False  # public 17 may not start label 0
    for s in range(2):
        g = atoms[truth[s], sets[s]].mean(0)
        picks = matched_starts(sets[s:s + 1], atoms, g, allowed, torch.zeros(1, 3, dtype=torch.long))
        assert sorted(picks[0].tolist()) == sorted(truth[s].tolist())  # slots with one label may swap
        assert all(allowed[n, c] for n, c in zip(picks[0].tolist(), sets[s].tolist()))
    # a public embedding excluded for a label, or held by another slot with the same label, is never picked
    g = atoms[[17, 17], [0, 0]].mean(0)
    picks = matched_starts(torch.tensor([[0, 0]]), atoms, g, allowed, torch.tensor([[1, 2]]))
    assert 17 not in picks.tolist()[0] and picks[0, 0] != picks[0, 1]


def test_candidate_label_sets_cover_every_multiset_once():
    distinct, every = candidate_label_sets(10, 4, distinct=True), candidate_label_sets(10, 4, distinct=False)
    assert len(distinct) == count_label_sets(10, 4, distinct=True) == 210
    assert len(every) == count_label_sets(10, 4, distinct=False) == 715
    as_tuples = [tuple(s) for s in every.tolist()]
    assert len(set(as_tuples)) == 715 and all(list(s) == sorted(s) for s in as_tuples)
    assert {tuple(s) for s in distinct.tolist()} == {s for s in as_tuples if len(set(s)) == 4}
    # a repeated label starts its copies from different public embeddings
    starts = aligned_starts(torch.tensor([[1, 1, 0]]), [torch.tensor([4, 5]), torch.tensor([2, 3])])
    assert starts.tolist() == [[2, 3, 4]]


def test_routes_follow_where_the_trainable_parameters_sit():
    expected = {"coop": "text", "text-adapter": "text", "adapter": "head", "linear-probe": "head", "vpt": "tower"}
    for peft, route in expected.items():
        task = setup(peft, pretrained="none")[3]
        assert route_of(task, task.names) == route, peft


def test_ridge_decoder_interpolates_its_training_images_and_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path))
    images = torch.rand(12, 3, 8, 8)
    encoder = torch.nn.Linear(3 * 8 * 8, 16)

    def encode(x):
        return F.normalize(encoder(x.flatten(1)), dim=-1)

    decoder = learned_prior("ridge", encoder, encode, images, 16)
    with torch.no_grad():
        err = ((decoder(encode(images)) - images) ** 2).mean()
    assert err < 0.5 * ((images.mean(0) - images) ** 2).mean()  # it learned its training images
    assert len(list((tmp_path / "priors").iterdir())) == 1
    again = learned_prior("ridge", encoder, encode, images, 16)
    assert torch.equal(again.coef, decoder.coef)
    assert len(shifted(images)) == 9 * len(images)
    some = shifted(images, 2, limit=50)  # a subset of the 25 shifted copies of each image
    every = shifted(images, 2).flatten(1)
    assert len(some) == 50 and (some.flatten(1)[:, None] == every[None]).all(-1).any(1).all()
    with pytest.raises(ValueError, match="valid: ridge, conv"):
        learned_prior("gan", encoder, encode, images, 16)
    assert isinstance(decoder, RidgeDecoder)


def test_mip_end_to_end_beats_the_mean_image_and_never_reads_private_data():
    # The decoder is cached next to the pre-trained tiny CLIP (keyed on the tower and the data).
    cfg, data, spec, task = setup("adapter", attack="mip", attack_iters=5)
    x, y = data.private.images[5:6].clone(), data.private.labels[5:6].clone()
    obs = observe(cfg, spec, task, x, y)
    attack = mip_attack(cfg)
    recon = attack.reconstruct(obs, task)
    assert recon.labels.tolist() == y.tolist() and recon.images.shape == x.shape
    mean_image = attack.public_images.mean(0, keepdim=True)
    assert ((recon.images - x) ** 2).mean() < ((mean_image - x) ** 2).mean()
    assert recon.extras["prior"] == "ridge" and recon.extras["route"] == "head"
    # Poison what the process holds of the private data: the output must not change.
    data.private.images.zero_()
    data.private.labels.fill_(9)
    try:
        again = attack.reconstruct(obs, task)
    finally:
        from fedsim.data import _load
        _load.cache_clear()
    assert torch.equal(again.images, recon.images) and torch.equal(again.labels, recon.labels)


def test_mip_refuses_classic_models_and_label_strategies():
    cfg, data, spec, task = setup("full", model="lenet", attack="mip")
    obs = observe(cfg, spec, task, data.private.images[:1], data.private.labels[:1])
    with pytest.raises(ConfigError, match="needs a CLIP model"):
        mip_attack(cfg).reconstruct(obs, task)
    with pytest.raises(ConfigError, match="does not apply to --attack mip"):
        RunConfig(attack="mip", label_strategy="idlg").validate()
    with pytest.raises(ConfigError, match="valid: ridge, conv, tv"):
        MIP(prior="gan")


@pytest.mark.parametrize("index", [0, 5])
def test_mip_attacks_visual_prompts_over_public_blends(index):
    cfg, data, spec, task = setup("vpt", attack="mip", attack_iters=0)
    x, y = data.private.images[index:index + 1], data.private.labels[index:index + 1]
    obs = observe(cfg, spec, task, x, y)
    attack = mip_attack(cfg)
    recon = attack.reconstruct(obs, task)
    assert recon.extras["route"] == "tower" and recon.extras["prior"] == "public-blend"
    assert recon.labels.tolist() == y.tolist()
    mean_image = attack.public_images.mean(0, keepdim=True)
    assert ((recon.images - x) ** 2).mean() < ((mean_image - x) ** 2).mean()
    assert recon.images.min() >= 0 and recon.images.max() <= 1


def test_pick_atoms_takes_the_best_pairs_and_never_reuses_an_image():
    from attacks.tower_side import pick_atoms

    distances = torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.05, 0.8], [0.3, 0.4, 0.6]])
    assert pick_atoms(distances, 1) == [(1, 1)]
    assert pick_atoms(distances, 2) == [(1, 1), (0, 0)]
    assert pick_atoms(distances, 3) == [(1, 1), (0, 0), (2, 0)]


@pytest.mark.parametrize("inputs,outputs", [(5, 12), (12, 5)])
def test_chunked_jacobian_matches_autograd(inputs, outputs):
    from torch.func import jacrev

    from attacks.embeddings import _jacobian

    W = torch.randn(outputs, inputs, dtype=torch.double)

    def fn(v):
        return torch.tanh(W @ v).view(outputs, 1) ** 2

    x = torch.randn(inputs, dtype=torch.double)
    assert torch.allclose(_jacobian(fn, x, outputs, chunk=2), jacrev(fn)(x).view(outputs, inputs))


def test_gradient_matching_differentiates_through_the_text_tower():
    """torch.func would otherwise send nn.MultiheadAttention down its inference fast path,
    which has no derivative (IG on CoOp failed with exactly that)."""
    from attacks.ig import InvertingGradients

    cfg, data, spec, task = setup("coop", pretrained="none")
    obs = observe(cfg, spec, task, data.private.images[:1], data.private.labels[:1])
    recon = InvertingGradients(iterations=2, restarts=2).reconstruct(obs, task)
    assert recon.images.shape == (1, 3, 32, 32) and torch.isfinite(torch.tensor(recon.extras["restart_losses"])).all()
    assert torch.backends.mha.get_fastpath_enabled()  # restored afterwards


def test_mip_attacks_lora_on_nn_multihead_attention():
    """peft's LoRA on nn.MultiheadAttention cannot run inside torch.func; gradient matching
    through the tower (here the TV prior's pixel route) falls back to plain autograd."""
    cfg, data, spec, task = setup("lora", pretrained="none", attack="mip", attack_iters=2, mip_prior="tv")
    obs = observe(cfg, spec, task, data.private.images[:1], data.private.labels[:1])
    recon = mip_attack(cfg).reconstruct(obs, task)
    assert recon.extras["route"] == "tower" and torch.isfinite(recon.images).all()


def test_atom_distances_do_not_depend_on_the_chunking(monkeypatch):
    """Large updates are scored in smaller chunks (memory); the distances must not change."""
    import attacks.tower_side as tower_side

    cfg, data, spec, task = setup("vpt", pretrained="none")
    obs = observe(cfg, spec, task, data.private.images[:1], data.private.labels[:1])
    public = data.public.images[:6]
    whole = tower_side.atom_distances(task, task.trainable(), obs.update, public)
    monkeypatch.setattr(tower_side, "CHUNK_FLOATS", sum(t.numel() for t in obs.update.values()) * 4)
    chunked = tower_side.atom_distances(task, task.trainable(), obs.update, public)
    assert whole.shape == (6, task.num_classes) and torch.allclose(whole, chunked, rtol=1e-4, atol=1e-6)


def test_text_adapter_gradient_gives_label_and_embedding_through_the_attack():
    # The update on which an experiment once crashed (the damped system of one candidate no
    # longer factorised; such a step now counts as rejected). It did not crash in this test.
    cfg, data, spec, task = setup("text-adapter", attack="mip")
    x, y = data.private.images[968:969], data.private.labels[968:969]
    params = task.trainable()
    update = local_update(Protocol.of(cfg), task, Defense(), x, y, params, torch.Generator().manual_seed(92))
    obs = Observation(1, 92, "gradient", update, params, 1, cfg.lr, 1, spec)
    labels, z, info = mip_attack(cfg).recover_embeddings(obs, task)
    assert labels.tolist() == y.tolist() and info["relative_residual"] < 1e-4
    assert F.cosine_similarity(z, true_embeddings(task, x)).item() > 0.99


def test_adapter_batch_with_a_repeated_label_is_separated_exactly():
    """Batch 4 on CLIP-Adapter, two images of one class: the span test finds every tower output
    and its label, and explains the update to its float32 rounding."""
    cfg, data, spec, task = setup("adapter")
    labels = data.private.labels
    first, second = (labels == 3).nonzero()[:2, 0].tolist()
    idx = [first, second, int((labels == 5).nonzero()[0]), int((labels == 8).nonzero()[0])]
    x, y = data.private.images[idx], labels[idx]
    obs = observe(cfg, spec, task, x, y)
    attack = mip_attack(cfg)
    found, features, info = head_side(task, task.trainable(), obs.update, 4, task.model.feature_weight,
                                      generator=torch.Generator().manual_seed(0),
                                      public_features=attack.public_features(task))
    assert info["separated"] == 4 and info["unexplained"] < 1e-4
    with torch.no_grad():
        truth = F.normalize(task.model.encode_image(x), dim=-1)
    cos = F.normalize(features, dim=-1) @ truth.T
    match = cos.argmax(1)
    assert sorted(match.tolist()) == [0, 1, 2, 3] and cos.max(1).values.min() > 0.999
    assert found.tolist() == y[match].tolist()  # each found direction carries its own label


def test_count_estimator_reads_counts_of_a_linear_model_and_ranks_the_true_set_first():
    from attacks.label_counts import CountEstimator, neighbours, rounded

    gen = torch.Generator().manual_seed(0)
    classes, batch, per_class = 5, 6, 40
    directions = torch.randn(classes, 30, generator=gen)
    labels = torch.arange(classes).repeat_interleave(per_class)
    atoms = directions[labels] + 0.05 * torch.randn(len(labels), 30, generator=gen)
    estimator = CountEstimator(atoms, labels, batch, sims=4000, ridge=1e-4, generator=gen)
    true = torch.tensor([0, 0, 0, 2, 4, 4])
    g = directions[true].mean(0)
    assert torch.allclose(estimator.estimate(g), torch.tensor([3.0, 0, 1, 0, 2], dtype=torch.float64), atol=0.3)
    assert estimator.ranked(g, 3)[0].tolist() == true.tolist()
    assert rounded(torch.tensor([2.6, -0.3, 0.9, 0.1, 2.2]), 6).tolist() == [0, 0, 0, 2, 4, 4]
    near = neighbours(true, classes, changes=1)
    assert len(near) == len({tuple(s) for s in near.tolist()}) and true.tolist() in near.tolist()
    assert all(int((F.one_hot(s, classes).sum(0) - F.one_hot(true, classes).sum(0)).abs().sum()) <= 2
               for s in near)


def test_coop_batch_beyond_the_exhaustive_search_goes_through_the_label_counts(coop_round):
    """Batch 3 has 220 label multisets: the count step shortlists them and the fit picks the set."""
    cfg, data, spec, task, jac, public = coop_round
    labels = data.private.labels
    idx = [int((labels == 1).nonzero()[0]), int((labels == 1).nonzero()[1]), int((labels == 7).nonzero()[0])]
    obs = observe(cfg, spec, task, data.private.images[idx], labels[idx])
    memo = {}
    found, _, info = text_side(task, task.trainable(), obs.update, 3, public, jacobian=jac,
                               public_labels=data.public.labels, memo=memo)
    assert "label_counts" in info and 3 in memo["counts"]  # the regression is kept for the round
    assert info["label_sets_tried"] <= 65  # the shortlist and the pursuit's set, not all 220
    assert sorted(found.tolist()) == [1, 1, 7]
