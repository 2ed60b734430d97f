import dataclasses
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
