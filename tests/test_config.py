import pytest

from fedsim.config import ConfigError, RunConfig
from fedsim.data import federated_data

ATTACKS, DEFENSES = ["dlg", "mip"], ["dp"]


@pytest.mark.parametrize("field,value,message", [
    ("attack", "nope", "valid: none, dlg, mip"),
    ("defense", "nope", "valid: none, dp"),
    ("clients", 0, "--clients must be >= 1"),
    ("batch_size", 0, "--batch-size must be >= 1"),
    ("dp_noise", -1.0, "--dp-noise must be >= 0"),
    ("peft", "prefix", "valid: coop, adapter"),
    ("model", "vit-h", "valid: tiny-clip, lenet"),
])
def test_bad_values_are_named_with_the_valid_ones(field, value, message):
    with pytest.raises(ConfigError) as err:
        RunConfig(**{field: value}).validate(ATTACKS, DEFENSES)
    assert message in str(err.value)
    assert str(value) in str(err.value)


def test_non_empty_out_needs_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(ConfigError, match="not empty"):
        RunConfig(out=str(tmp_path)).validate(ATTACKS, DEFENSES)
    RunConfig(out=str(tmp_path), overwrite=True).validate(ATTACKS, DEFENSES)
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_batch_larger_than_smallest_client_is_refused():
    with pytest.raises(ConfigError, match=r"--batch-size 500 is larger than the smallest client's data"):
        federated_data(RunConfig(clients=10, batch_size=500))


def test_yaml_round_trip(tmp_path):
    cfg = RunConfig(clients=4, attack="none", dp_noise=0.5)
    cfg.save(tmp_path / "config.yaml")
    assert RunConfig.load(tmp_path / "config.yaml") == cfg


def test_unknown_yaml_key_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("clients: 2\nclinets: 3\n")
    with pytest.raises(ConfigError, match="clinets"):
        RunConfig.load(tmp_path / "c.yaml")


def test_label_strategy_is_checked_and_reaches_the_attack():
    from attacks.dlg import DLG

    with pytest.raises(ConfigError, match="valid: default, optimise, idlg"):
        RunConfig(label_strategy="guess").validate(ATTACKS, DEFENSES)
    attack = DLG.from_config(RunConfig(label_strategy="idlg"))
    assert attack.label_strategy == "idlg"
    assert DLG.from_config(RunConfig(label_strategy="optimise")).label_strategy is None


def test_an_attack_without_label_strategies_refuses_one():
    from attacks.base import Attack

    class Blind(Attack):
        def reconstruct(self, observation, task):
            raise NotImplementedError

    with pytest.raises(ConfigError, match="takes no label strategy"):
        Blind.from_config(RunConfig(attack="blind", label_strategy="llg"))
