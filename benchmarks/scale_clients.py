"""Wall time and peak memory of `fedsim run` as the federation grows.

    .venv/bin/python benchmarks/scale_clients.py --clients 10 100 1000 --fraction 0.1

Each size runs `fedsim run --rounds 1 --attack none` in a subprocess; memory is the peak of the
summed resident set of the whole process tree (driver, Ray's daemons and its worker actors),
sampled every 0.2 s.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time

import psutil

from fedsim.protocol import Protocol


def tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def measure(clients: int, fraction: float) -> tuple[float, float, int]:
    with tempfile.TemporaryDirectory() as out:
        cmd = [sys.executable, "-m", "fedsim.cli", "run", "--clients", str(clients), "--rounds", "1",
               "--attack", "none", "--fraction", str(fraction), "--out", f"{out}/run"]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        ps, peak = psutil.Process(proc.pid), 0
        while proc.poll() is None:
            peak = max(peak, tree_rss(ps))
            time.sleep(0.2)
        wall = time.perf_counter() - start
        if proc.returncode:
            raise SystemExit(f"--clients {clients} failed:\n{proc.stderr.read()}")
        return wall, peak / 2**30, Protocol(clients=clients, fraction=fraction).sampled_clients


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[10, 100, 1000])
    parser.add_argument("--fraction", type=float, default=0.1)
    args = parser.parse_args()
    print(f"{'clients':>8} {'sampled':>8} {'wall s':>8} {'peak GiB':>9}")
    for n in args.clients:
        wall, peak, sampled = measure(n, args.fraction)
        print(f"{n:8d} {sampled:8d} {wall:8.1f} {peak:9.2f}", flush=True)


if __name__ == "__main__":
    main()
