import dataclasses
import math
import pickle

import pytest
import torch

from fedsim.observation import Observation


def make_obs(kind="gradient"):
    return Observation(round=1, client=2, kind=kind, update={"w": torch.randn(3, 4)},
                       global_params={"w": torch.randn(3, 4)}, batch_size=1, lr=0.1, local_steps=1,
                       model_spec={"model": "lenet", "class_names": ["a", "b"]})


def test_save_and_load_round_trip(tmp_path):
    obs = make_obs()
    obs.save(tmp_path / "o.pt")
    back = Observation.load(tmp_path / "o.pt")
    assert back.meta() == obs.meta()
    torch.testing.assert_close(back.update["w"], obs.update["w"])


def test_observation_fields_hold_no_data_or_seed():
    names = {f.name for f in dataclasses.fields(Observation)}
    assert names == {"round", "client", "kind", "update", "global_params", "batch_size", "lr",
                     "local_steps", "model_spec", "clients"}  # clients: the ids behind a secure aggregate


def test_a_pickled_object_is_refused(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "evil.pt", "wb") as f:
        pickle.dump({"format": 1, "meta": Evil()}, f)
    with pytest.raises(ValueError, match="not a readable observation"):
        Observation.load(tmp_path / "evil.pt")


def test_delta_becomes_a_pseudo_gradient():
    obs = make_obs("delta")
    torch.testing.assert_close(obs.gradient()["w"], -obs.update["w"] / 0.1)


def test_bad_kind_is_named():
    with pytest.raises(ValueError, match="'weights' is not valid; valid: gradient, delta"):
        make_obs("weights")


@pytest.fixture(scope="module")
def saved_lenet(tmp_path_factory):
    """A real observation of LeNet, saved, and the blob it is made of."""
    from fedsim.config import RunConfig
    from fedsim.harness import Setting

    obs, _ = Setting(RunConfig(clients=1, model="lenet", peft="full", attack="dlg"), device="cpu").observe(1, 0)
    path = tmp_path_factory.mktemp("obs") / "round1_client0.pt"
    obs.save(path)
    return path, torch.load(path, weights_only=True)


def tamper(blob, change):
    blob = {**blob, "meta": dict(blob["meta"]), "update": dict(blob["update"]),
            "global_params": dict(blob["global_params"])}
    blob["meta"]["model_spec"] = dict(blob["meta"]["model_spec"])
    change(blob)
    return blob


def first(blob, part):
    return next(iter(blob[part]))


def poison(tensors, name):
    tensors[name] = tensors[name] * math.nan


TAMPERED = {  # what is changed -> the words the error must hold
    "metadata not a mapping": (lambda b: b.update(meta=[1, 2]), "not a mapping"),
    "unknown metadata": (lambda b: b["meta"].update(secret=1), "unknown: secret"),
    "missing metadata": (lambda b: b["meta"].pop("lr"), "missing: lr"),
    "zero learning rate on a delta": (lambda b: b["meta"].update(kind="delta", lr=0.0), "learning rate"),
    "a string as batch size": (lambda b: b["meta"].update(batch_size="8"), "batch_size"),
    "missing update": (lambda b: b["update"].pop(first(b, "update")), "different tensors"),
    "NaN in the update": (lambda b: poison(b["update"], first(b, "update")), "NaN"),
    "shapes unlike each other": (lambda b: b["update"].update({first(b, "update"): torch.zeros(3)}), "shape"),
    "shapes unlike the model": (lambda b: (b["update"].update({first(b, "update"): torch.zeros(3)}),
                                           b["global_params"].update({first(b, "update"): torch.zeros(3)})),
                                "does not fit the model"),
    "a checkpoint path inside the file": (lambda b: b["meta"]["model_spec"].update(model="tiny-clip", peft="coop",
                                                                                  pretrained="/etc/passwd"),
                                          "pass the checkpoint with --pretrained"),
    "unknown model description key": (lambda b: b["meta"]["model_spec"].update(loader="x"), "unknown keys loader"),
    "a negative context length": (lambda b: b["meta"]["model_spec"].update(n_ctx=-3), "--n-ctx"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_tampered_observation_files_are_refused_with_a_reason(saved_lenet, tmp_path, case):
    from typer.testing import CliRunner

    from fedsim.cli import app

    path, blob = saved_lenet
    change, words = TAMPERED[case]
    bad = tmp_path / "observations" / "bad.pt"
    bad.parent.mkdir()
    torch.save(tamper(blob, change), bad)
    result = CliRunner().invoke(app, ["attack", str(bad), "--attack", "dlg", "--attack-iters", "1", "--out",
                                      str(tmp_path / "r.png")], env={"COLUMNS": "300"})
    assert result.exit_code == 2, result.output
    assert words in " ".join(result.output.split()), result.output
    assert not (tmp_path / "r.png").exists()


def test_replay_checks_its_own_options_before_attacking(saved_lenet, tmp_path):
    from typer.testing import CliRunner

    from fedsim.cli import app

    path, _ = saved_lenet
    for extra, words in ((["--attack-iters", "-1"], "--attack-iters must be in 0..1,000,000, got -1"),
                         (["--out", str(tmp_path)], "must be a file in an existing directory")):
        result = CliRunner().invoke(app, ["attack", str(path), "--attack", "dlg", *extra], env={"COLUMNS": "300"})
        assert result.exit_code == 2 and words in " ".join(result.output.split()), result.output
    ok = CliRunner().invoke(app, ["attack", str(path), "--attack", "dlg", "--attack-iters", "1", "--out",
                                  str(tmp_path / "r.png")], env={"COLUMNS": "300"})
    assert ok.exit_code == 0 and (tmp_path / "r.png").exists(), ok.output  # the untampered file replays
