"""The Flower-native path: fedsim.app's ServerApp/ClientApp driven by Flower's run config."""

import importlib.metadata
import os
import shutil
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pandas as pd
import pytest

from fedsim.config import ConfigError, RunConfig
from fedsim.engine import run_inprocess

ROOT = Path(__file__).resolve().parents[1]


def app_config() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["flwr"]["app"]["config"]


def test_run_config_is_the_one_derived_from_the_declarations():
    """pyproject's table is what `fedsim flwr-config` writes: every core field and every built-in
    plugin option, with its default (regenerate it after adding an option)."""
    from fedsim.cli import flwr_app_config

    assert app_config() == tomllib.loads(flwr_app_config())["tool"]["flwr"]["app"]["config"]
    assert RunConfig.from_run_config(app_config()) == RunConfig()


def test_run_config_is_cast_and_checked():
    cfg = RunConfig.from_run_config({"batch-size": 4, "lr": 1, "attack": "ig"})
    assert (cfg.batch_size, cfg.lr, cfg.attack) == (4, 1.0, "ig") and isinstance(cfg.lr, float)
    with pytest.raises(ConfigError, match="unknown run-config key 'batchsize'; valid: .*batch-size"):
        RunConfig.from_run_config({"batchsize": 4})


def test_apps_run_a_round_from_the_run_config(tmp_path):
    from fedsim.app import client_app, server_app

    out = tmp_path / "run"
    run_config = {"clients": 2, "model": "lenet", "peft": "full", "attack": "dlg", "attack-iters": 1,
                  "out": str(out)}
    run_inprocess(server_app, client_app, 2, run_config)
    results = pd.read_csv(out / "results.csv")
    assert sorted(results["client"]) == [0, 1] and set(results["status"]) == {"ok"}
    assert set(results["model"]) == {"lenet"}  # the clients trained what the run config says
    assert RunConfig.load(out / "config.yaml").option("attack_iters") == 1
    assert len(pd.read_csv(out / "metrics.csv")) == 2  # before round 1 and after it


def test_server_refuses_a_federation_smaller_than_clients(tmp_path):
    from fedsim.app import client_app, server_app

    with pytest.raises(ConfigError, match="clients=3 but the federation has 2 SuperNodes"):
        run_inprocess(server_app, client_app, 2, {"clients": 3, "out": str(tmp_path / "run")})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_port(port: int, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the SuperLink exited with code {proc.returncode}"
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.5)
    raise TimeoutError(f"the SuperLink did not listen on port {port} within {seconds} s")


def flower_scripts(bin_dir: Path) -> None:
    """Flower's console scripts for this interpreter: the SuperLink starts `flwr-simulation` and
    `flower-superexec` from PATH, which must run the Python that has fedsim."""
    bin_dir.mkdir()
    for ep in importlib.metadata.distribution("flwr").entry_points.select(group="console_scripts"):
        script = bin_dir / ep.name
        module, func = ep.value.split(":")
        script.write_text(f"#!{sys.executable}\nimport sys\nfrom {module} import {func}\nsys.exit({func}())\n")
        script.chmod(0o755)


def stop_tree(proc: subprocess.Popen) -> None:
    """The SuperLink's children start their own sessions: stop them by id, then the SuperLink."""
    import psutil

    try:
        children = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        children = []
    for p in [*children, psutil.Process(proc.pid)] if proc.poll() is None else children:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=10)


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_flwr_run_runs_the_app(tmp_path):
    """`flwr run . --stream` against a SuperLink in simulation mode, as in the README."""
    home, bin_dir, out = tmp_path / "flwr-home", tmp_path / "bin", tmp_path / "run"
    flower_scripts(bin_dir)
    http, control = free_port(), free_port()
    home.mkdir()
    (home / "config.toml").write_text(f'[superlink]\ndefault = "test"\n\n[superlink.test]\n'
                                      f'address = "127.0.0.1:{http}"\ninsecure = true\n')
    env = {**os.environ, "FLWR_HOME": str(home), "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
           "FLWR_TELEMETRY_ENABLED": "0", "OMP_NUM_THREADS": "1"}
    superlink = subprocess.Popen(
        [str(bin_dir / "flower-superlink"), "--insecure", "--simulation", "--isolation", "subprocess",
         "--disable-runtime-dependency-installation", "--database", ":flwr-in-memory:",
         "--host", "127.0.0.1", "--port", str(http), "--control-api-address", f"127.0.0.1:{control}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        overrides = f"clients=2 model='lenet' peft='full' attack='dlg' attack-iters=1 out='{out}'"
        cmd = [str(bin_dir / "flwr"), "run", ".", "--stream", "--federation-config", "num-supernodes=2",
               "--run-config", overrides]
        wait_for_port(http, superlink)
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=200)
        assert "Successfully started run" in done.stdout, done.stdout + done.stderr
        results = pd.read_csv(out / "results.csv")
        assert sorted(results["client"]) == [0, 1] and set(results["status"]) == {"ok"}
    finally:
        stop_tree(superlink)
        shutil.rmtree(home, ignore_errors=True)
