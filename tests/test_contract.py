"""The threat model as a contract, checked for every installed attack (through the entry points,
so a third party's is covered too): an attack sees the server's knowledge and the Observation,
never the private data or the data seed, and its own seed reproduces it."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from fedsim.config import RunConfig
from fedsim.data import _load, load_dataset
from fedsim.harness import Setting
from fedsim.knowledge import AttackerKnowledge
from fedsim.models import derive_seed
from fedsim.plugins import attack_names

DATA_SEED = 4321
# A linear-probe CLIP client (every attack and label rule applies to it) on the cached pre-trained tiny CLIP, with a
# non-default data seed and a label-skewed partition; two iterations keep every attack quick.
SETTING = dict(clients=3, peft="linear-probe", seed=DATA_SEED, partition="dirichlet", attack_iters=2, attack_seed=5)


def reconstruct(setting):
    obs, truth = setting.observe(1, 0)
    return setting.attack().reconstruct(obs, setting.task), obs, truth


def poison_private_data(setting) -> None:
    """Overwrite, in place, every image and label of the dataset this process holds (the cached
    loader result and the clients' pool): whatever reads them from now on reads zeros."""
    for dataset in (load_dataset(setting.cfg), setting.data.private):
        dataset.images.zero_()
        dataset.labels.zero_()


@pytest.mark.parametrize("attack", attack_names())
def test_an_attack_never_reads_the_private_data_and_its_seed_reproduces_it(attack):
    setting = Setting(RunConfig(attack=attack, **SETTING))
    before, obs, truth = reconstruct(setting)
    again = setting.attack().reconstruct(obs, setting.task)  # a fresh attack, the same attack seed
    assert torch.equal(again.images, before.images) and torch.equal(again.labels, before.labels)
    setting.knowledge  # built before the poisoning, as the server holds it before any reply
    poison_private_data(setting)
    try:
        after = setting.attack().reconstruct(obs, setting.task)
    finally:
        _load.cache_clear()  # the poisoned cache must not leak into other tests
    assert torch.equal(after.images, before.images) and torch.equal(after.labels, before.labels)


def test_the_poisoning_catches_an_attack_that_reads_the_data():
    """The check above can fail: an attack that loads the dataset itself is caught."""
    from fedsim.api import Attack, Reconstruction

    class Peek(Attack):
        def reconstruct(self, observation, task):
            images = load_dataset(RunConfig()).images[:1].clone()
            return Reconstruction(images, torch.zeros(1, dtype=torch.long))

    setting = Setting(RunConfig(attack="dlg", **SETTING))
    obs, _ = setting.observe(1, 0)
    before = Peek().reconstruct(obs, setting.task)
    poison_private_data(setting)
    try:
        after = Peek().reconstruct(obs, setting.task)
    finally:
        _load.cache_clear()
    assert not torch.equal(after.images, before.images)


def server_view(data_seed: int):
    setting = Setting(RunConfig(**{**SETTING, "seed": data_seed}))
    obs, truth = setting.observe(1, 0)
    return setting.knowledge, obs, truth


def test_the_server_view_holds_nothing_that_pins_down_the_data_seed():
    knowledge, obs, truth = server_view(DATA_SEED)
    other, other_obs, _ = server_view(8765)
    # The knowledge and everything of the Observation but the update itself are the same under
    # another data seed, so nothing in them can depend on it.
    assert torch.equal(knowledge.public.images, other.public.images)
    assert dataclasses.replace(knowledge, public=None) == dataclasses.replace(other, public=None)
    assert obs.meta() == other_obs.meta()
    assert all(torch.equal(obs.global_params[n], other_obs.global_params[n]) for n in obs.global_params)
    # Brute force, as a curious server would: every number it holds against every small seed
    # and the one-way derivations fedsim uses.
    numbers = {v for v in [*obs.meta().values(), *knowledge.model_spec.values(),
                           *dataclasses.asdict(knowledge.protocol).values(), knowledge.attack_seed]
               if isinstance(v, int) and not isinstance(v, bool)}
    found = [s for s in range(10_000) if {s, derive_seed(s, "model"), derive_seed(s, "attack")} & numbers
             and s == DATA_SEED]
    assert found == []
    # Nothing the server holds carries a private index or the client's images.
    assert set(obs.meta()) == {"round", "client", "kind", "batch_size", "lr", "local_steps", "model_spec",
                               "clients"}
    assert not any(t.shape == truth.images.shape and torch.equal(t, truth.images)
                   for t in [*obs.update.values(), *obs.global_params.values()])


def test_knowledge_is_built_from_the_public_parts_of_a_config_only():
    a, b = AttackerKnowledge.of(RunConfig(seed=1)), AttackerKnowledge.of(RunConfig(seed=2, partition="shard"))
    assert torch.equal(a.public.labels, b.public.labels) and a.model_spec == b.model_spec
    assert AttackerKnowledge.of(RunConfig(attack_seed=9)).attack_seed == 9


# ------------------------------------------------------------- a third party's attack and option

PLUGIN = '''
"""A third party's attack: the public mean image, dimmed by its option `level`."""
import torch

from fedsim.api import Attack, Option, Reconstruction


class Dummy(Attack):
    name = "dummy"
    options = (*Attack.options, Option("level", 10, "brightness in tenths", check=lambda v: 0 <= v <= 10,
                                       valid="in 0..10"))

    def __init__(self, level=10, public=None, **kw):
        super().__init__(**kw)
        self.level, self.public = level, public

    @classmethod
    def from_knowledge(cls, knowledge, options=None, progress=None):
        return cls(public=knowledge.public.images, seed=knowledge.attack_seed,
                   **{k: v for k, v in (options or {}).items() if v is not None})

    def reconstruct(self, observation, task):
        mean = self.public.mean(0, keepdim=True) * self.level / 10
        return Reconstruction(mean.expand(observation.batch_size, -1, -1, -1).clone(),
                              torch.full((observation.batch_size,), -1))
'''


@pytest.fixture(scope="module")
def third_party(tmp_path_factory):
    """An installed distribution `dummy-attack` whose entry point adds `--attack dummy`."""
    site = tmp_path_factory.mktemp("site")
    (site / "dummy_attack.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "dummy_attack-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: dummy-attack\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[fedsim.attacks]\ndummy = dummy_attack:Dummy\n")
    return site


def fedsim(site, *args, timeout=300):
    """`fedsim ARGS` in a fresh process that has the third party's distribution installed."""
    code = "import sys; sys.path.insert(0, sys.argv.pop(1)); from fedsim.cli import app; app()"
    return subprocess.run([sys.executable, "-c", code, str(site), *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "COLUMNS": "200", "FLWR_TELEMETRY_ENABLED": "0"})


def test_a_third_party_option_works_on_the_command_line_in_grids_and_the_flwr_config(third_party, tmp_path):
    helped = fedsim(third_party, "run", "--help")
    assert helped.returncode == 0 and "--dummy-level" in helped.stdout and "attack: dummy" in helped.stdout
    listed = fedsim(third_party, "list")
    assert "dummy" in listed.stdout and "--dummy-level (10)" in listed.stdout
    table = fedsim(third_party, "flwr-config")
    assert "dummy-level = 10" in table.stdout
    out = tmp_path / "run"
    ran = fedsim(third_party, "run", "--attack", "dummy", "--dummy-level", "3", "--model", "lenet", "--peft", "full",
                 "--clients", "2", "--engine", "inprocess", "--out", str(out))
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "dummy_level: 3" in (out / "config.yaml").read_text()
    refused = fedsim(third_party, "run", "--attack", "dummy", "--dummy-level", "11", "--out", str(tmp_path / "x"))
    assert refused.returncode == 2 and "--dummy-level must be in 0..10, got 11" in refused.stdout
    # In this process: the run config of `flwr run` and a sweep grid take the option by key.
    sys.path.insert(0, str(third_party))
    from importlib import invalidate_caches

    from fedsim.options import declared
    from fedsim.plugins import available

    invalidate_caches()
    declared.cache_clear()
    available.cache_clear()
    try:
        from fedsim.grid import parse_grid

        cfg = RunConfig.from_run_config({"attack": "dummy", "dummy-level": 4})
        assert cfg.option("dummy_level") == 4
        grid = parse_grid({"base": {"attack": "dummy", "model": "lenet", "peft": "full"},
                           "grid": {"dummy_level": [1, 2]}})
        assert [t.config.option("dummy_level") for t in grid.trials] == [1, 2]
    finally:
        sys.path.remove(str(third_party))
        invalidate_caches()
        declared.cache_clear()
        available.cache_clear()


def imported_modules(package: str) -> dict[str, set[str]]:
    """Every module each file of a package imports, read from the source (ast), lazily or not."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / package
    found = {}
    for path in root.rglob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
        found[str(path.relative_to(root.parent))] = names
    return found


def test_layering_fedsim_never_imports_plugins_and_plugins_reach_no_private_data():
    """fedsim finds plugins through entry points only; attacks and defenses depend on the plugin
    API (fedsim.api and what it names), never on the data, the run config or the runner."""
    for path, names in imported_modules("fedsim").items():
        assert not {n for n in names if n.split(".")[0] in ("attacks", "defenses")}, path
    forbidden = {"fedsim.data", "fedsim.config", "fedsim.harness", "fedsim.runner", "fedsim.flower",
                 "fedsim.training", "fedsim.sweep", "fedsim.datasets"}
    for package in ("attacks", "defenses"):
        for path, names in imported_modules(package).items():
            assert not names & forbidden, (path, names & forbidden)


def test_replay_builds_the_knowledge_the_run_had():
    from fedsim.config import ConfigError
    from fedsim.replay import replay_knowledge

    cfg = RunConfig(**SETTING)
    setting = Setting(cfg)
    obs, _ = setting.observe(1, 0)
    replayed = replay_knowledge(obs, cfg, None)
    assert torch.equal(replayed.public.images, setting.knowledge.public.images)
    assert replayed.model_spec == obs.model_spec == setting.knowledge.model_spec
    with pytest.raises(ConfigError, match="pass the run's dataset"):
        replay_knowledge(obs, None, "faces")
