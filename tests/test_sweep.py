import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml
from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.config import ConfigError
from fedsim.grid import load_grid, parse_grid, trial_id
from fedsim.sweep import ResultsTable, sweep

# The smallest trial that still runs the whole flow: 2 clients, random-init tiny CLIP, one DLG step.
TINY = {"clients": 2, "pretrained": "none", "attack": "dlg", "attack_iters": 1}


def write_grid(tmp_path, spec, name="grid.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize("spec,message", [
    ({"grid": {"atack": ["dlg"]}}, "unknown field 'atack'; valid: clients"),
    ({"grid": {"clients": ["two"]}}, "clients = 'two' is a str; clients takes a int"),
    ({"base": {"lr": True}, "grid": {"seed": [0]}}, "lr = True is a bool; lr takes a float"),
    ({"grid": {}}, "the grid is empty"),
    ({}, "the grid is empty"),
    ({"grid": {"seed": []}}, "grid.seed must be a non-empty list"),
    ({"grid": {"attack": ["dlg", "nope"]}}, "--attack 'nope' is not valid; valid: none, dlg"),
    ({"grid": {"out": ["x"]}}, "'out' is set by the sweep"),
    ({"grid": {"seed": [0]}, "trials": [{"seed": 1}, {"seed": 2}]}, "same run as trial"),
    ({"grids": {"seed": [0]}}, "unknown top-level keys ['grids']"),
    ({"grid": {"seed": [0, 1]}, "report": {"values": ["psnrr"]}}, "report value 'psnrr' is not valid"),
])
def test_bad_grid_is_refused_with_a_clear_message(spec, message):
    with pytest.raises(ConfigError) as err:
        parse_grid(spec)
    assert message in str(err.value)


def test_bad_grid_stops_the_cli_before_any_trial(tmp_path):
    grid = write_grid(tmp_path, {"base": TINY, "grid": {"seed": [0, 1], "lr": ["fast"]}})
    result = CliRunner().invoke(app, ["sweep", str(grid), "--out", str(tmp_path / "s")], env={"COLUMNS": "200"})
    assert result.exit_code == 2
    assert "lr = 'fast' is a str; lr takes a float" in " ".join(result.output.split())
    assert not (tmp_path / "s").exists()  # no Ray, no table, nothing


def test_grid_crosses_the_list_with_the_product_and_ids_follow_the_config():
    grid = parse_grid({"base": TINY, "grid": {"seed": [0, 1]},
                       "trials": [{"peft": "coop"}, {"peft": "adapter", "adapter_ratio": 0.5}]})
    configs = [(t.config.peft, t.config.seed, t.config.adapter_ratio) for t in grid.trials]
    assert configs == [("coop", 0, 0.2), ("coop", 1, 0.2), ("adapter", 0, 0.5), ("adapter", 1, 0.5)]
    assert grid.swept == ["peft", "adapter_ratio", "seed"]
    assert grid.report["rows"] == ["peft"] and grid.report["columns"] == ["adapter_ratio"]
    assert all(t.config.engine == "inprocess" for t in grid.trials)
    again = parse_grid({"base": TINY, "grid": {"seed": [1, 0]}, "trials": [{"peft": "coop"}]})
    assert {t.id for t in again.trials} <= {t.id for t in grid.trials}  # same config, same id, any order
    moved = grid.trials[0].config
    moved.out = "/elsewhere"
    assert trial_id(moved) == grid.trials[0].id  # where a trial writes is not part of its identity


def test_a_crash_while_writing_leaves_the_previous_table_whole_and_the_journal_the_rest(tmp_path, monkeypatch):
    first, second = parse_grid({"base": TINY, "grid": {"seed": [0, 1]}}).trials
    table = ResultsTable(tmp_path)
    table.add(first, [{"client": 0, "psnr": 12.5}, {"client": 1, "psnr": 13.0}], "ok", None, 1.0)
    table.write()
    table.add(second, [{"client": 0, "psnr": 9.0}], "ok", None, 1.0)  # in the journal at once

    def crash(df, path, **kwargs):  # dies halfway through writing the new table
        Path(path).write_bytes(b"PAR1 half a file")
        raise OSError("disk full")

    monkeypatch.setattr(pd.DataFrame, "to_parquet", crash)
    with pytest.raises(OSError):
        table.write()
    monkeypatch.undo()
    assert pd.read_parquet(tmp_path / "results.parquet")["psnr"].tolist() == [12.5, 13.0]  # the previous, whole
    (tmp_path / "results.journal").open("a").write('{"trial_id": "cut sh')  # and a line a kill cut short
    kept = ResultsTable(tmp_path)  # what a resumed sweep reads: the table, then the journal
    assert kept.finished() == {first.id, second.id} and kept.df["psnr"].tolist() == [12.5, 13.0, 9.0]
    assert pd.read_csv(tmp_path / "results.csv")["psnr"].tolist() == [12.5, 13.0, 9.0]


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance with 2 CPUs for every sweep test in this module (start-up takes seconds)."""
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"}})
    yield ray.get_runtime_context().gcs_address
    ray.shutdown()


def consistent(out, trials):
    """The Parquet table and its CSV copy agree, and every trial appears once with all its rows."""
    table = pd.read_parquet(out / "results.parquet")
    csv = pd.read_csv(out / "results.csv")
    assert len(csv) == len(table) and list(csv.columns) == list(table.columns)
    assert sorted(table["trial_id"].unique()) == sorted(t.id for t in trials)
    assert not list(out.glob("*.tmp"))
    return table


@pytest.mark.slow
def test_four_trial_sweep_on_two_local_cpus(tmp_path, local_ray):
    base = {**TINY, "attack_timeout": 900.0}  # not part of a trial's id, but the trial must still get it
    grid = load_grid(write_grid(tmp_path, {"base": base, "grid": {"peft": ["coop", "adapter"], "seed": [0, 1]}}))
    summary = sweep(grid, tmp_path / "s")
    table = consistent(tmp_path / "s", grid.trials)
    assert len(summary.ran) == 4 and not summary.failed
    assert (table["trial_status"] == "ok").all() and (table["status"] == "ok").all()
    assert table.groupby("trial_id").size().tolist() == [2] * 4  # one row per attacked client
    assert table["psnr"].between(0, 60).all()
    # both CPUs were used: some two trials ran at the same time
    spans = sorted(summary.spans.values())
    assert any(b[0] < a[1] for a, b in zip(spans, spans[1:]))
    pivot = pd.read_csv(tmp_path / "s" / "pivot_psnr.csv", index_col=0)
    assert sorted(pivot.index) == ["adapter", "coop"]
    assert (tmp_path / "s" / "pivot_psnr.png").stat().st_size > 0
    for t in grid.trials:
        assert (tmp_path / "s" / "trials" / t.id / "results.csv").exists()
        assert (tmp_path / "s" / "trials" / t.id / "report.html").exists()  # each trial's own page
        saved = yaml.safe_load((tmp_path / "s" / "trials" / t.id / "config.yaml").read_text())
        assert saved["attack_timeout"] == 900.0
    assert "trials/" in (tmp_path / "s" / "report.html").read_text()  # the sweep's page links them
    assert sweep(grid, tmp_path / "s").ran == []  # all finished: nothing runs again


def test_a_grid_crossing_a_defense_with_its_options_runs_the_undefended_trial_once():
    grid = parse_grid({"base": TINY, "grid": {"defense": ["none", "dp"], "dp_noise": [0.1, 1.0]}})
    assert [(t.config.defense, t.config.option("dp_noise")) for t in grid.trials] == [
        ("none", 0.1), ("dp", 0.1), ("dp", 1.0)]


def test_a_trial_whose_plugins_do_not_read_an_axis_option_keeps_its_row():
    from fedsim.sweep import pivots

    df = pd.DataFrame({"trial_status": "ok", "status": "ok", "defense": ["none", "dp", "dp"],
                       "dp_noise": [None, 0.1, 1.0], "psnr": [20.0, 8.0, 4.0]})
    table = pivots(df, {"rows": ["defense", "dp_noise"], "columns": [], "values": ["psnr"]})["psnr"]
    assert table.loc[("none", "-"), "psnr"] == 20.0 and len(table) == 3


@pytest.mark.slow
def test_a_failing_trial_is_recorded_and_the_others_complete(tmp_path, local_ray):
    # batch 5000 passes the grid's checks but no client holds that many images: the trial raises
    grid = parse_grid({"base": {**TINY, "attack": "none"}, "grid": {"batch_size": [1, 5000]}})
    summary = sweep(grid, tmp_path / "s")
    table = consistent(tmp_path / "s", grid.trials)
    by_status = table.drop_duplicates("trial_id").set_index("batch_size")
    assert by_status.loc[1, "trial_status"] == "ok"
    assert by_status.loc[5000, "trial_status"] == "failed"
    error = by_status.loc[5000, "trial_error"]
    assert "ConfigError" in error and "--batch-size 5000 is larger than the smallest client's data" in error
    assert len(summary.failed) == 1 and "--batch-size 5000" in (tmp_path / "s" / "errors.log").read_text()
    rerun = sweep(grid, tmp_path / "s")  # a failed trial runs again; the finished one does not
    assert rerun.ran == summary.failed
    assert len(consistent(tmp_path / "s", grid.trials)) == 2  # its old row was replaced, not duplicated


@pytest.mark.slow
def test_a_sweep_killed_midway_resumes_with_only_the_missing_trials(tmp_path, local_ray):
    grid_file = write_grid(tmp_path, {"base": {**TINY, "attack": "none"}, "grid": {"seed": [0, 1, 2, 3]}})
    out = tmp_path / "s"
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fedsim.cli", "sweep", str(grid_file), "--out", str(out),
                             "--address", local_ray], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env=env, start_new_session=True)
    try:
        deadline = time.time() + 240
        while not any((out / name).exists() for name in ("results.journal", "results.parquet")) \
                and proc.poll() is None and time.time() < deadline:
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the whole driver, mid-sweep
        proc.wait()
    grid = load_grid(grid_file)
    before = ResultsTable(out).df  # the table the killed sweep wrote, and its journal
    finished = set(before["trial_id"])
    assert 1 <= len(finished) < 4, "the sweep was meant to be killed between trials"
    stamps = before.set_index("trial_id")["trial_finished"]

    summary = sweep(grid, out)
    assert sorted(summary.ran) == sorted(t.id for t in grid.trials if t.id not in finished)
    assert sorted(summary.skipped) == sorted(finished)
    table = consistent(out, grid.trials)
    assert (table["trial_status"] == "ok").all() and len(table) == 4  # attack none: one row per trial
    assert (table.set_index("trial_id").loc[list(finished), "trial_finished"] == stamps.loc[list(finished)]).all()


GRIDS = sorted((Path(__file__).parents[1] / "experiments" / "grids").glob("*.yaml"))


@pytest.mark.parametrize("path", GRIDS, ids=lambda p: p.stem)
def test_experiment_grids_are_valid(path):
    from fedsim.plugins import attack_names

    spec = yaml.safe_load(path.read_text())
    named = {spec.get("base", {}).get("attack"), *spec.get("grid", {}).get("attack", [])} - {None}
    missing = sorted(named - {"none", *attack_names()})
    if missing:  # a grid waiting for its attack plugin is refused up front, naming it
        with pytest.raises(ConfigError, match=f"--attack '{missing[0]}' is not valid"):
            load_grid(path)
        pytest.skip(f"needs the attack plugin {missing[0]}, not installed")
    grid = load_grid(path)
    assert len(grid.trials) >= 2 and grid.swept
    assert set(grid.report["rows"] + grid.report["columns"]) <= set(grid.swept)
