import subprocess
import sys

import pandas as pd
import pytest
from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.config import CORE, RunConfig

runner = CliRunner()


def test_run_help_lists_every_option_with_its_default_grouped_by_concern():
    from fedsim.options import declared

    result = runner.invoke(app, ["run", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0
    for name in [*CORE, *declared()]:
        assert f"--{name.replace('_', '-')}" in result.output
    assert "default: 10" in result.output and "dlg" in result.output
    panels = ["data", "model", "federation", "attack", "attack: every attack", "attack: mip", "defense",
              "defense: dp", "defense: dp-update, flower-dp", "run"]
    positions = [result.output.index(f"─ {panel} ─") for panel in panels]
    assert positions == sorted(positions)  # grouped by concern, in this order


@pytest.mark.parametrize("args,message", [
    (["--attack", "nope"], "valid: none, dlg, gradinversion, idlg, ig, mip"),
    (["--defense", "nope"], "valid: none, dp"),
    (["--clients", "0"], "--clients must be >= 1"),
    (["--dp-noise", "-1"], "--dp-noise must be >= 0"),
    (["--batch-size", "400"], "larger than the smallest client's data"),
])
def test_bad_input_fails_fast_with_a_clear_message(args, message, tmp_path):
    result = runner.invoke(app, ["run", "--out", str(tmp_path / "o"), *args], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "o").exists()  # nothing was started or written


def test_list_shows_builtin_plugins():
    result = runner.invoke(app, ["list"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and "dlg" in result.output and "dp" in result.output


def test_existing_output_is_kept(tmp_path):
    (tmp_path / "results.csv").write_text("precious")
    result = runner.invoke(app, ["run", "--out", str(tmp_path)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "--overwrite" in result.output
    assert (tmp_path / "results.csv").read_text() == "precious"


@pytest.mark.slow
def test_run_end_to_end_writes_results_pictures_and_config(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "fedsim.cli", "run", "--clients", "3", "--attack-iters", "2",
                           "--out", str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = pd.read_csv(out / "results.csv")
    for col in ("round", "client", "attack", "defense", "peft", "batch_size", "label_acc", "mse", "psnr",
                "ssim", "lpips", "seconds", "status", "emb_cos", "emb_cos_centred", "prior"):
        assert col in results.columns
    assert (results["attack"] == "mip").all() and results["emb_cos"].between(-1, 1).all()
    assert sorted(results["client"]) == [0, 1, 2] and (results["status"] == "ok").all()
    assert results["psnr"].between(0, 60).all()
    for client in range(3):
        assert (out / "reconstructions" / f"round1_client{client}.png").stat().st_size > 0
        assert (out / "observations" / f"round1_client{client}.pt").exists()
    assert RunConfig.load(out / "config.yaml") == RunConfig(clients=3, attack_iters=2, out=str(out))
    assert "fedsim results" in proc.stdout

    saved = out / "observations" / "round1_client0.pt"
    replay = subprocess.run([sys.executable, "-m", "fedsim.cli", "attack", str(saved),
                             "--attack-iters", "1", "--out", str(tmp_path / "replay.png")],
                            capture_output=True, text=True, timeout=300)
    assert replay.returncode == 0, replay.stdout + replay.stderr
    assert (tmp_path / "replay.png").exists()


def test_replay_refuses_a_file_that_is_not_an_observation(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a tensor archive")
    result = runner.invoke(app, ["attack", str(bad)], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "not a readable observation" in result.output
