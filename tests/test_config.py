import pytest

from fedsim.config import ConfigError, RunConfig
from fedsim.data import federated_data


@pytest.mark.parametrize("field,value,message", [
    ("attack", "nope", "valid: none, dlg, gradinversion"),
    ("defense", "nope", "valid: none, dp, dp-update"),
    ("clients", 0, "--clients must be >= 1"),
    ("batch_size", 0, "--batch-size must be >= 1"),
    ("dp_noise", -1.0, "--dp-noise must be >= 0"),
    ("lr", float("nan"), "--lr must be a finite number"),
    ("dp_clip", float("inf"), "--dp-clip must be a finite number"),
    ("seed", -1, "--seed must be in 0..2^63-1"),
    ("peft", "prefix", "valid: coop, adapter"),
    ("model", "vit-h", "valid: tiny-clip, lenet"),
])
def test_bad_values_are_named_with_the_valid_ones(field, value, message):
    with pytest.raises(ConfigError) as err:
        RunConfig(**{field: value}).validate()
    assert message in str(err.value)
    assert str(value) in str(err.value)


def test_non_empty_out_needs_overwrite(tmp_path):
    (tmp_path / "keep.txt").write_text("precious")
    with pytest.raises(ConfigError, match="not empty"):
        RunConfig(out=str(tmp_path)).validate()
    RunConfig(out=str(tmp_path), overwrite=True).validate()
    assert (tmp_path / "keep.txt").read_text() == "precious"


def test_batch_larger_than_smallest_client_is_refused():
    with pytest.raises(ConfigError, match=r"--batch-size 500 is larger than the smallest client's data"):
        federated_data(RunConfig(clients=10, batch_size=500))


def test_yaml_round_trip(tmp_path):
    cfg = RunConfig(clients=4, attack="none", defense="dp", dp_noise=0.5)
    cfg.save(tmp_path / "config.yaml")
    assert RunConfig.load(tmp_path / "config.yaml") == cfg


def test_unknown_yaml_key_is_named(tmp_path):
    (tmp_path / "c.yaml").write_text("clients: 2\nclinets: 3\n")
    with pytest.raises(ConfigError, match="clinets"):
        RunConfig.load(tmp_path / "c.yaml")


def test_label_strategy_is_checked_and_reaches_the_attack():
    from fedsim.knowledge import AttackerKnowledge
    from fedsim.plugins import make_attack

    with pytest.raises(ConfigError, match="valid: default, optimise, idlg"):
        RunConfig(attack="dlg", label_strategy="guess").validate()
    knowledge = AttackerKnowledge.of(RunConfig())
    assert make_attack(RunConfig(attack="dlg", label_strategy="idlg"), knowledge).label_strategy == "idlg"
    assert make_attack(RunConfig(attack="dlg", label_strategy="optimise"), knowledge).label_strategy is None
    assert make_attack(RunConfig(attack="dlg"), knowledge).label_strategy is None  # DLG's own: joint
    assert make_attack(RunConfig(attack="idlg"), knowledge).label_strategy == "idlg"  # iDLG's own rule


def test_an_option_no_chosen_plugin_reads_is_refused():
    with pytest.raises(ConfigError, match="--label-strategy does not apply to --attack mip.*read by dlg"):
        RunConfig(attack="mip", label_strategy="llg").validate()
    with pytest.raises(ConfigError, match="--dp-noise does not apply"):
        RunConfig(defense="prune", dp_noise=0.3).validate()


def test_unset_attack_iterations_mean_each_attacks_own_default():
    from fedsim.knowledge import AttackerKnowledge
    from fedsim.plugins import make_attack

    knowledge = AttackerKnowledge.of(RunConfig())
    own = {name: make_attack(RunConfig(attack=name), knowledge).iterations for name in ("dlg", "ig", "mip")}
    assert own == {"dlg": 300, "ig": 24_000, "mip": 100}
    assert make_attack(RunConfig(attack="mip", attack_iters=7), knowledge).iterations == 7


def test_data_model_and_attack_seeds_are_independent():
    from fedsim.models import model_spec

    a, b = RunConfig(seed=1), RunConfig(seed=2)
    assert model_spec(a, ("x",)) == model_spec(b, ("x",))  # the model description ignores the data seed
    assert model_spec(RunConfig(model_seed=3), ("x",))["model_seed"] == 3
