"""Interrupts, kills and faults during a run or a sweep, then resume: no finished row is lost, no
process is left behind, and a resumed run's table is the one an uninterrupted run writes."""

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from fedsim.config import ConfigError, RunConfig
from fedsim.interrupts import RunStopped
from fedsim.outdir import LOCK, staging_dir
from fedsim.report import ResultsWriter
from fedsim.runner import run

FEDSIM = [sys.executable, "-c", "from fedsim.cli import main; main()"]
RUN = dict(model="lenet", peft="full", attack="dlg", attack_iters=10, clients=3, rounds=2)
ROWS = 6  # clients x rounds


def run_args(out: Path, engine: str = "inprocess") -> list[str]:
    return ["run", "--model", "lenet", "--peft", "full", "--attack", "dlg", "--attack-iters", "10", "--clients", "3",
            "--rounds", "2", "--engine", engine, "--out", str(out)]


def rows_in(path: Path) -> int:
    return max(len(path.read_text().splitlines()) - 1, 0) if path.exists() else 0


def start(args: list[str]) -> subprocess.Popen:
    """A fedsim command in its own process group, so that whatever it starts can be found."""
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "COLUMNS": "200"}
    return subprocess.Popen([*FEDSIM, *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True, env=env)


def wait_for(condition, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"exited early ({proc.returncode}): {proc.stdout.read()}"
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.1)


def group_gone(pgid: int, timeout: float = 30) -> bool:
    """Every process of the group has exited (Ray's workers take a few seconds)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.2)
    return False


def table(out: Path) -> pd.DataFrame:
    """results.csv without the wall-time column, in (round, client) order."""
    df = pd.read_csv(out / "results.csv").drop(columns="seconds")
    return df.sort_values(["round", "client"]).reset_index(drop=True)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> pd.DataFrame:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    run(RunConfig(**RUN, engine="inprocess", out=str(out)))
    return table(out)


@pytest.mark.slow
@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGKILL, -9)], ids=["SIGINT", "SIGKILL"])
def test_a_signal_keeps_the_finished_rows_and_resume_gives_the_uninterrupted_table(
        sig, code, tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = start(run_args(out))
    wait_for(lambda: rows_in(out / "results.csv") >= 2, proc)
    proc.send_signal(sig)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == code, output
    kept = table(out)
    assert 2 <= len(kept) < ROWS  # well formed, and nothing finished is lost
    pd.testing.assert_frame_equal(kept, uninterrupted.merge(kept[["round", "client"]], on=["round", "client"]))
    if sig != signal.SIGKILL:
        said = " ".join(output.split())
        assert f"stopped on {signal.Signals(sig).name}: {len(kept)} of {ROWS} rows" in said
        assert f"Continue with: fedsim run --resume --out {out}" in said
        assert not (out / LOCK).exists()
        page = (out / "report.html").read_text()  # the page says so too, and stops saying it once resumed
        assert 'id="interrupted"' in page and f"fedsim run --resume --out {out}" in page
    assert group_gone(proc.pid)
    result = run(RunConfig(out=str(out), resume=True))  # a lock left by the killed run is taken over
    assert result.config.attack == "dlg" and result.config.rounds == 2  # the saved config, not the defaults
    pd.testing.assert_frame_equal(table(out), uninterrupted)
    assert 'id="interrupted"' not in (out / "report.html").read_text()


def test_resume_refuses_options_that_differ_from_the_saved_run(tmp_path):
    with pytest.raises(ConfigError, match="holds no config.yaml"):
        run(RunConfig(out=str(tmp_path), resume=True))
    RunConfig(**RUN, out=str(tmp_path)).save(tmp_path / "config.yaml")
    with pytest.raises(ConfigError, match=r"--rounds 5 \(saved: 2\)"):
        run(RunConfig(out=str(tmp_path), resume=True, rounds=5))
    with pytest.raises(ConfigError, match="contradict"):
        RunConfig(out=str(tmp_path), resume=True, overwrite=True).validate()


def test_a_cut_last_row_is_dropped_on_resume(tmp_path):
    path = tmp_path / "results.csv"
    writer = ResultsWriter(path)
    writer.write({"round": 1, "client": 0, "status": "ok", "psnr": 20.0})
    writer.write({"round": 1, "client": 1, "status": "ok", "psnr": 21.0})
    whole = path.read_text()
    path.write_text(whole[: whole.rindex("\n", 0, len(whole) - 1) + 8])  # the second row cut short
    assert ResultsWriter(path, resume=True).finished == {(1, 0)}
    assert rows_in(path) == 1 and path.read_text().endswith("\n")
    path.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a fedsim results table"):
        ResultsWriter(path, resume=True)


def test_a_full_disk_stops_the_run_with_its_rows_kept(tmp_path, monkeypatch):
    honest, written = ResultsWriter.write, []

    def disk_fills_after_two(self, row):
        if len(written) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.path))
        honest(self, row)
        written.append(row)

    monkeypatch.setattr(ResultsWriter, "write", disk_fills_after_two)
    out = tmp_path / "run"
    with pytest.raises(ConfigError, match="No space left on device") as refused:
        run(RunConfig(**RUN, engine="inprocess", out=str(out)))
    assert "The 2 rows finished before it" in str(refused.value) and "--resume" in str(refused.value)
    assert rows_in(out / "results.csv") == 2 and not (out / LOCK).exists()
    monkeypatch.setattr(ResultsWriter, "write", honest)
    assert len(run(RunConfig(out=str(out), resume=True)).results) == ROWS


def test_an_interrupted_overwrite_leaves_the_old_run_whole(tmp_path, monkeypatch):
    from attacks.dlg import DLG

    out = tmp_path / "run"
    small = dict(RUN, rounds=1, attack_iters=2)
    run(RunConfig(**small, engine="inprocess", out=str(out)))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    honest, calls = DLG.reconstruct, []

    def interrupted_on_the_second(self, observation, task):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return honest(self, observation, task)

    monkeypatch.setattr(DLG, "reconstruct", interrupted_on_the_second)
    with pytest.raises(RunStopped, match=f"{out} still holds the previous run, untouched"):
        run(RunConfig(**{**small, "attack_seed": 1}, engine="inprocess", out=str(out), overwrite=True))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    assert rows_in(staging_dir(out) / "results.csv") == 1
    monkeypatch.setattr(DLG, "reconstruct", honest)
    result = run(RunConfig(out=str(out), resume=True))  # continues the staged run, then swaps it in
    assert result.config.attack_seed == 1 and len(result.results) == 3
    assert not staging_dir(out).exists() and "attack_seed: 1" in (out / "config.yaml").read_text()


@pytest.mark.slow
def test_sigterm_on_the_ray_engine_stops_at_once_and_ends_ray(tmp_path):
    """Ctrl-C takes the same path (the in-process test above); SIGTERM under Ray used to end in
    Ray's own handler's stack dump."""
    out = tmp_path / "run"
    proc = start(run_args(out, engine="ray"))
    wait_for(lambda: rows_in(out / "results.csv") >= 1, proc)
    signalled = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    output = proc.communicate(timeout=120)[0]
    assert proc.returncode == 143, output
    assert time.monotonic() - signalled < 60  # not after attacking every remaining client
    assert "Continue with: fedsim run --resume" in " ".join(output.split())
    assert group_gone(proc.pid), "Ray processes left behind"
    kept = rows_in(out / "results.csv")
    assert 1 <= kept < ROWS and (out / "timings.json").exists() and (out / "report.html").exists()


@pytest.mark.slow
def test_a_client_that_never_answers_is_left_out_after_the_client_timeout(tmp_path):
    import ray

    def client_1_hangs():  # runs in every Ray worker before it takes work
        import time as clock

        import fedsim.flower

        honest = fedsim.flower.client_update

        def hang(cfg_json, client, round_, params):
            if client == 1:
                clock.sleep(3600)
            return honest(cfg_json, client, round_, params)

        fedsim.flower.client_update = hang

    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"worker_process_setup_hook": client_1_hangs,
                          "env_vars": {"FLWR_TELEMETRY_ENABLED": "0"}})
    try:
        start_s = time.monotonic()
        result = run(RunConfig(**{**RUN, "rounds": 1, "attack_iters": 2}, engine="ray", client_timeout=20,
                               out=str(tmp_path / "run")))
    finally:
        ray.shutdown()
    assert sorted(result.results["client"]) == [0, 2] and (result.results["status"] == "ok").all()
    assert time.monotonic() - start_s < 300


SWEEP_GRID = """
base: {model: lenet, peft: full, attack: dlg, attack_iters: 10, clients: 1}
grid: {seed: [0, 1, 2]}
"""


def own_ray_processes(temp_dir: str) -> list:
    """The processes of the Ray cluster whose temporary directory is `temp_dir` (ours alone)."""
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in part for part in proc.info["cmdline"] or ()):
                found.append(proc)
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_a_sweep_loses_a_worker_node_and_no_finished_trial(tmp_path):
    """A real two-node Ray cluster on 127.0.0.1; the worker node is killed while it runs a
    trial. Ray retries the trial on the head node; whatever finished stays in the table."""
    import socket
    import tempfile

    import psutil

    from fedsim.grid import load_grid
    from fedsim.sweep import ResultsTable, sweep

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    ray_bin = str(Path(sys.executable).with_name("ray"))
    temp_dir = tempfile.mkdtemp(prefix="/tmp/rn")  # short: Ray's socket paths must fit in 107 bytes
    port, worker_port = free_port(), free_port()
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--node-ip-address=127.0.0.1", "--num-cpus=1", "--num-gpus=0"]
    try:
        subprocess.run([ray_bin, "start", "--head", f"--port={port}", f"--temp-dir={temp_dir}",
                        "--include-dashboard=false", *common], check=True, env=env, capture_output=True, timeout=120)
        subprocess.run([ray_bin, "start", f"--address=127.0.0.1:{port}", f"--node-manager-port={worker_port}",
                        *common], check=True, env=env, capture_output=True, timeout=120)
        grid_file, out = tmp_path / "grid.yaml", tmp_path / "sweep"
        grid_file.write_text(SWEEP_GRID)
        grid = load_grid(grid_file)

        killed = []

        def kill_worker_node_when_a_trial_is_done():
            deadline = time.monotonic() + 300
            while time.monotonic() < deadline and not ((out / "results.journal").exists()
                                                       or (out / "results.parquet").exists()):
                time.sleep(0.2)
            for proc in own_ray_processes(temp_dir):  # the worker node's raylet and what it started
                if any(f"--node_manager_port={worker_port}" in part for part in proc.info["cmdline"] or ()):
                    try:
                        family = [*proc.children(recursive=True), proc]
                    except psutil.NoSuchProcess:
                        continue
                    for child in family:
                        try:
                            child.kill()
                        except psutil.NoSuchProcess:  # a worker that ended on its own meanwhile
                            pass
                    killed.append(proc.pid)

        import threading

        killer = threading.Thread(target=kill_worker_node_when_a_trial_is_done, daemon=True)
        killer.start()
        summary = sweep(grid, out, address=f"127.0.0.1:{port}")
        killer.join(timeout=60)
        assert killed, "the worker node's raylet was not found"
        finished = ResultsTable(out).finished()
        assert len(finished) + len(summary.failed) == 3  # every trial is in the table, ok or failed
        again = sweep(grid, out, address=f"127.0.0.1:{port}")  # a resume runs only what did not finish
        assert set(again.skipped) == finished and len(ResultsTable(out).finished()) == 3
    finally:
        for proc in own_ray_processes(temp_dir):
            try:
                proc.kill()
            except psutil.Error:
                pass
        psutil.wait_procs(own_ray_processes(temp_dir), timeout=30)
    assert not own_ray_processes(temp_dir), "Ray processes left behind"
