"""Every PEFT method: only its own parameters train, the functional path really uses them,
gradients can be differentiated again (attacks need that), per-example gradients agree."""

import pytest
import torch

from fedsim.config import ConfigError, RunConfig
from fedsim.data import federated_data
from fedsim.models import build_task, model_spec

EXPECTED_PREFIX = {
    "coop": ["prompt.ctx"],
    "adapter": ["image_adapter."],
    "text-adapter": ["text_adapter."],
    "double-adapter": ["image_adapter.", "text_adapter."],
    "lora": ["clip.visual.transformer.resblocks."],
    "vpt": ["visual_prompt.tokens"],
    "linear-probe": ["head."],
    "full": ["clip."],
}


def make(peft="coop", batch_size=3, **kw):
    cfg = RunConfig(peft=peft, batch_size=batch_size, **kw)
    data = federated_data(cfg)
    return cfg, data, build_task(model_spec(cfg, data.private.class_names))


@pytest.mark.parametrize("peft", list(EXPECTED_PREFIX))
def test_peft_method_trains_only_its_parameters(peft):
    cfg, data, task = make(peft)
    assert all(any(n.startswith(p) for p in EXPECTED_PREFIX[peft]) for n in task.names), task.names
    if peft == "lora":
        assert all("lora_" in n for n in task.names)
    if peft != "full":
        n_trainable = sum(p.numel() for p in task.trainable().values())
        assert n_trainable < 0.01 * sum(p.numel() for p in task.model.parameters())

    images, labels = data.client_batch(cfg, 1, 0)
    params = task.trainable()
    # The functional path must read the parameters it is given, not the module's own copies.
    shifted = {n: p + 0.5 * torch.randn_like(p) for n, p in params.items()}
    assert not torch.allclose(task.logits(params, images), task.logits(shifted, images))

    grads = task.gradients(shifted, images, labels)
    assert set(grads) == set(params) and all(torch.isfinite(g).all() for g in grads.values())
    per = task.per_example_gradients(shifted, images, labels)
    for n in grads:
        torch.testing.assert_close(per[n].mean(0), grads[n], rtol=1e-3, atol=5e-5)  # float32 sums

    dummy = torch.rand_like(images, requires_grad=True)
    second = task.gradients(shifted, dummy, labels, create_graph=True)
    sum((g ** 2).sum() for g in second.values()).backward()
    assert dummy.grad.abs().sum() > 0


def test_class_specific_coop_has_one_context_per_class():
    _, _, task = make("coop", coop_class_specific=True, n_ctx=2)
    assert task.trainable()["prompt.ctx"].shape == (10, 2, 64)


def test_lora_targets_mlp_and_text_tower():
    _, _, task = make("lora", lora_targets="c_fc,c_proj", lora_tower="text")
    assert task.names and all(".mlp.c_" in n and "visual" not in n for n in task.names)


def test_lora_out_proj_is_refused_with_the_reason():
    with pytest.raises(ConfigError, match="target attn"):
        RunConfig(peft="lora", lora_targets="out_proj").validate()


@pytest.mark.parametrize("model,params", [("lenet", 15_826), ("convnet", 175_178), ("resnet18", 11_181_642)])
def test_classic_models_train_every_parameter(model, params):
    cfg, data, task = make("full", model=model, batch_size=2)
    assert sum(p.numel() for p in task.trainable().values()) == params
    images, labels = data.client_batch(cfg, 1, 0)
    assert task.logits(task.trainable(), images).shape == (2, 10)


def test_lenet_weights_are_uniform_in_half_unit():
    _, _, task = make("full", model="lenet")
    w = torch.cat([p.flatten() for p in task.trainable().values()])
    assert w.min() >= -0.5 and w.max() <= 0.5 and w.std() > 0.25


def test_clip_at_another_resolution_resizes_inside():
    cfg, data, task = make("adapter", image_size=24)
    images, _ = data.client_batch(cfg, 1, 0)
    assert images.shape[-1] == 24 and task.logits(task.trainable(), images).shape == (3, 10)


def test_unknown_model_lists_valid_ones():
    with pytest.raises(ConfigError, match="tiny-clip, lenet, convnet, resnet18, or an open_clip model"):
        RunConfig(model="vit-h").validate()


def test_coop_refuses_prompts_longer_than_the_text_context():
    """The tiny CLIP's text context holds 16 tokens: 13 context vectors would cut '.' and 14 the
    class name itself (every class the same prompt); refuse, naming the limit."""
    names = ("zero", "one")
    build_task(model_spec(RunConfig(n_ctx=12, pretrained="none"), names))
    for n_ctx in (13, 14, 20):
        with pytest.raises(ConfigError, match=rf"--n-ctx {n_ctx} does not fit.*holds 16; valid: --n-ctx 1..12"):
            build_task(model_spec(RunConfig(n_ctx=n_ctx, pretrained="none"), names))
