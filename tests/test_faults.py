"""Faults a run must survive without losing what it finished: a client update holding NaN, an
attack returning NaN, a second run into the same --out, an interrupted checkpoint rebuild."""

import os
import subprocess
import sys

import pandas as pd
import pytest
import torch

import fedsim.harness
from fedsim.config import ConfigError, RunConfig
from fedsim.outdir import LOCK, output_lock
from fedsim.runner import run


def lenet_run(out, **kw):
    return RunConfig(clients=2, model="lenet", peft="full", attack="dlg", attack_iters=1, engine="inprocess",
                     out=str(out), **kw)


def test_an_update_holding_nan_is_recorded_not_attacked(tmp_path, monkeypatch):
    honest = fedsim.harness.local_update

    def broken_for_client_1(protocol, task, defense, images, labels, params, generator, ids=None):
        update = honest(protocol, task, defense, images, labels, params, generator, ids)
        if ids is not None and ids[2] == 1:
            name = next(iter(update))
            update[name] = update[name] * float("nan")
        return update

    monkeypatch.setattr(fedsim.harness, "local_update", broken_for_client_1)
    result = run(lenet_run(tmp_path / "run"))
    rows = result.results.set_index("client")
    assert rows.loc[0, "status"] == "ok"
    assert rows.loc[1, "status"] == "invalid" and "NaN or infinite" in rows.loc[1, "error"]
    assert "not attacked" in (tmp_path / "run" / "report.html").read_text()


def test_an_attack_returning_nan_is_a_failed_row(tmp_path, monkeypatch):
    from attacks.dlg import DLG

    honest = DLG.reconstruct

    def nan_pixels(self, observation, task):
        recon = honest(self, observation, task)
        recon.images[:] = float("nan")
        return recon

    monkeypatch.setattr(DLG, "reconstruct", nan_pixels)
    result = run(lenet_run(tmp_path / "run"))
    assert (result.results["status"] == "failed").all()
    assert result.results["error"].str.contains("NaN or infinite pixels").all()


def test_a_second_run_into_a_held_out_directory_is_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (out / LOCK).write_text(str(holder.pid))
        with pytest.raises(ConfigError, match=f"in use by another fedsim run \\(pid {holder.pid}\\)"):
            run(lenet_run(out, overwrite=True))
    finally:
        holder.kill()
        holder.wait()
    # the holder is gone: its lock is stale, the run takes it over and releases it at the end
    result = run(lenet_run(out, overwrite=True))
    assert len(result.results) == 2 and not (out / LOCK).exists()


def test_the_lock_is_released_when_the_run_fails(tmp_path):
    with pytest.raises(RuntimeError):
        with output_lock(tmp_path):
            assert (tmp_path / LOCK).read_text() == str(os.getpid())
            raise RuntimeError("boom")
    assert not (tmp_path / LOCK).exists()


def test_an_interrupted_rebuild_keeps_the_old_checkpoint(tmp_path, monkeypatch):
    import fedsim.models.pretrain as pretrain

    path = tmp_path / "tiny.safetensors"
    path.write_bytes(b"the old, good checkpoint")
    monkeypatch.setattr(pretrain, "checkpoint_path", lambda seed=0: path)

    def interrupted(seed, progress=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(pretrain, "pretrain", interrupted)
    with pytest.raises(KeyboardInterrupt):
        pretrain.ensure_pretrained(rebuild=True)
    assert path.read_bytes() == b"the old, good checkpoint"
    monkeypatch.setattr(pretrain, "pretrain", lambda seed, progress=None: {"w": torch.ones(2)})
    assert pretrain.ensure_pretrained(rebuild=True) == path
    from safetensors.torch import load_file

    assert torch.equal(load_file(str(path))["w"], torch.ones(2))
    assert pd.Series(os.listdir(tmp_path)).tolist() == ["tiny.safetensors"]  # no temporary left


def test_an_attack_past_its_budget_is_a_timeout_row_and_the_run_goes_on(tmp_path):
    import time

    start = time.perf_counter()
    cfg = lenet_run(tmp_path / "run")
    cfg.options["attack_iters"], cfg.attack_timeout = 1_000_000, 0.5
    result = run(cfg)
    assert (result.results["status"] == "timeout").all() and len(result.results) == 2
    assert result.results["error"].str.contains("--attack-timeout").all()
    assert time.perf_counter() - start < 60  # a million L-BFGS steps would take hours
    assert "timed out" in (tmp_path / "run" / "report.html").read_text()


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_a_budget_must_be_a_finite_number_of_seconds(bad):
    with pytest.raises(ConfigError, match="--attack-timeout"):
        RunConfig(attack_timeout=bad).validate()


def test_an_out_under_a_file_is_an_error_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from fedsim.cli import app

    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    for command in (["run", "--model", "lenet", "--peft", "full", "--engine", "inprocess"],
                    ["sweep", "experiments/grids/defense_tradeoff_small.yaml"]):
        result = CliRunner().invoke(app, [*command, "--out", str(blocker / "sub" / "dir")], env={"COLUMNS": "300"})
        assert result.exit_code == 2, result.output
        assert "which is a file, not a directory" in " ".join(result.output.split())


@pytest.mark.parametrize("field, value, words", [
    ("image_size", 1, "--image-size must be in 8..1024"),
    ("image_size", 100_000, "--image-size must be in 8..1024"),
    ("seed", 2**70, "--seed must be in 0..2^63-1"),
    ("model_seed", -1, "--model-seed must be in 0..2^63-1"),
    ("attack_seed", -5, "--attack-seed must be in 0..2^63-1"),
])
def test_values_that_used_to_fail_late_are_refused_first(field, value, words):
    with pytest.raises(ConfigError, match=words.replace("^", "\\^").replace(".", "\\.")):
        RunConfig(**{field: value}).validate()


def test_lora_with_no_target_is_refused():
    with pytest.raises(ConfigError, match="names no module"):
        RunConfig(peft="lora", lora_targets="").validate()
