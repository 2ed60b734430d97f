import pytest
import torch
from safetensors.torch import save_file

from fedsim.config import ConfigError, RunConfig
from fedsim.data import federated_data
from fedsim.models import build_task, model_spec
from fedsim.models import pretrain as pt


def test_pretraining_lowers_the_contrastive_loss():
    losses = []
    pt.pretrain(seed=0, recipe=pt.Recipe(steps=40, batch_size=64, lr=3e-3),
                progress=lambda done, total, loss: losses.append(loss))
    assert len(losses) == 40
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.3


def test_checkpoint_is_built_once_and_written_atomically(tmp_path, monkeypatch):
    monkeypatch.setenv("FEDSIM_CACHE", str(tmp_path))
    calls = []

    def fake_pretrain(seed, progress=None):
        calls.append(seed)
        return {"w": torch.ones(2)}

    monkeypatch.setattr(pt, "pretrain", fake_pretrain)
    path = pt.ensure_pretrained()
    assert path.exists() and path.parent == tmp_path / "models" and calls == [0]
    assert pt.ensure_pretrained() == path and calls == [0]  # cached: not rebuilt
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_a_local_checkpoint_file_is_loaded(tmp_path):
    cfg = RunConfig(pretrained="none", peft="adapter")
    data = federated_data(cfg)
    random_task = build_task(model_spec(cfg, data.private.class_names))
    state = {k: v.clone() for k, v in random_task.model.clip.state_dict().items()}
    state["visual.proj"] = state["visual.proj"] * 0 + 0.125
    save_file(state, str(tmp_path / "clip.safetensors"))
    cfg.pretrained = str(tmp_path / "clip.safetensors")
    loaded = build_task(model_spec(cfg, data.private.class_names))
    assert torch.all(loaded.model.clip.visual.proj == 0.125)


def test_pretrained_is_checked_against_the_model():
    with pytest.raises(ConfigError, match="valid: none"):
        RunConfig(model="lenet", peft="full", pretrained="openai").validate()


def test_the_shipped_pretrained_tiny_clip_separates_images():
    """Random-init CLIP features are nearly identical for unrelated images; pre-trained ones are not."""
    cosines = {}
    for pretrained in ("none", "fedsim"):
        cfg = RunConfig(pretrained=pretrained, peft="linear-probe")
        data = federated_data(cfg)
        task = build_task(model_spec(cfg, data.private.class_names))
        with torch.no_grad():
            f = task.model.image_features(data.private.images[:100])
        cosines[pretrained] = float(((f @ f.T).sum() - 100) / (100 * 99))
    assert cosines["none"] > 0.8 and cosines["fedsim"] < cosines["none"] - 0.3, cosines
