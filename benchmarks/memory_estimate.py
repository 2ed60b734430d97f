"""fedsim.memory's estimate against the measured peak resident memory of real runs.

Each configuration runs as `fedsim run --engine inprocess --clients 1 --rounds 1 --attack-iters 2`
in a subprocess; its peak resident set (ru_maxrss, from os.wait4 on that child alone) is compared
with `fedsim.memory.estimate` of the same RunConfig. The subprocess gets a fresh FEDSIM_CACHE
(the pre-trained tiny CLIP linked in from the usual cache), so MIP fits its prior as on first use,
and FEDSIM_MEMORY_CHECK=0, so a check in `fedsim run` does not refuse the larger runs.

    PYTHONPATH=. .venv/bin/python benchmarks/memory_estimate.py            # about 5 minutes on 2 cores
    PYTHONPATH=. .venv/bin/python benchmarks/memory_estimate.py --only convnet --json out.json
    PYTHONPATH=. .venv/bin/python benchmarks/memory_estimate.py --src /tmp/snapshot   # run another tree's fedsim

`--src DIR` runs the subprocesses on the fedsim found first in DIR (e.g. a snapshot made with
`git archive HEAD | tar -x -C DIR`; fedsim is a namespace package, so modules DIR lacks still come
from this checkout) while the estimate comes from this checkout's fedsim.memory.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from fedsim.config import RunConfig
from fedsim.memory import GiB, estimate
from fedsim.models.pretrain import cache_dir

ROOT = Path(__file__).resolve().parent.parent
FIXED = {"engine": "inprocess", "clients": 1, "rounds": 1, "attack_iters": 2}
VIT = {"model": "ViT-S-32-alt", "pretrained": "none"}
CONFIGS = [  # (label, RunConfig fields and plugin options); the default set takes about 5 minutes
    ("tiny-clip 32 b1 dlg", {"attack": "dlg"}),
    ("tiny-clip 128 b8 none", {"image_size": 128, "batch_size": 8, "attack": "none", "attack_iters": None}),
    ("tiny-clip 128 b8 dlg", {"image_size": 128, "batch_size": 8, "attack": "dlg"}),
    ("tiny-clip 64 b4 ig r2", {"image_size": 64, "batch_size": 4, "attack": "ig", "attack_restarts": 2}),
    ("tiny-clip 32 b1 mip", {"attack": "mip"}),
    ("lenet 64 b4 dlg", {"model": "lenet", "peft": "full", "image_size": 64, "batch_size": 4, "attack": "dlg"}),
    ("lenet 64 b4 soteria", {"model": "lenet", "peft": "full", "image_size": 64, "batch_size": 4,
                             "attack": "none", "attack_iters": None, "defense": "soteria"}),
    ("convnet 128 b8 ig", {"model": "convnet", "peft": "full", "image_size": 128, "batch_size": 8, "attack": "ig"}),
    ("ViT-S-32-alt adapter b16 ig", {**VIT, "peft": "adapter", "batch_size": 16, "attack": "ig"}),
    ("ViT-S-32-alt full b1 ig", {**VIT, "peft": "full", "attack": "ig"}),
]
MORE = [  # --all adds these (about 5 more minutes)
    ("convnet 64 b8 ig", {"model": "convnet", "peft": "full", "image_size": 64, "batch_size": 8, "attack": "ig"}),
    ("tiny-clip 64 b4 dlg", {"image_size": 64, "batch_size": 4, "attack": "dlg"}),
    ("tiny-clip 64 b1 mip", {"image_size": 64, "attack": "mip"}),
    ("lenet 32 b1 dlg", {"model": "lenet", "peft": "full", "attack": "dlg"}),
    ("convnet 32 b4 ig", {"model": "convnet", "peft": "full", "batch_size": 4, "attack": "ig"}),
    ("convnet 64 b4 dlg", {"model": "convnet", "peft": "full", "image_size": 64, "batch_size": 4, "attack": "dlg"}),
    ("convnet 128 b4 dp", {"model": "convnet", "peft": "full", "image_size": 128, "batch_size": 4,
                           "attack": "none", "attack_iters": None, "defense": "dp"}),
]


def flags(values: dict) -> list[str]:
    out = []
    for key, value in values.items():
        if value is not None:
            out += [f"--{key.replace('_', '-')}", str(value)]
    return out


def measure(values: dict, src: Path, cache: Path, timeout: float) -> tuple[int, float, str]:
    """(peak resident bytes, seconds, status of the attack or the run) of one run. The child is
    reaped with os.wait4, which gives its own ru_maxrss (getrusage(RUSAGE_CHILDREN) would give
    the maximum over all children so far)."""
    with tempfile.TemporaryDirectory(prefix="fedsim-mem-") as out, tempfile.TemporaryFile("w+") as log:
        env = {**os.environ, "PYTHONPATH": str(src), "FEDSIM_CACHE": str(cache), "FLWR_TELEMETRY_ENABLED": "0",
               "FEDSIM_MEMORY_CHECK": "0"}
        cmd = [sys.executable, "-m", "fedsim.cli", "run", *flags(values), "--out", out, "--overwrite"]
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=src, env=env, stdout=subprocess.DEVNULL, stderr=log)
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        _, code, usage = os.wait4(proc.pid, 0)
        timer.cancel()
        proc.returncode = os.waitstatus_to_exitcode(code)  # reaped here: keep Popen from waiting again
        seconds = time.perf_counter() - start
        log.seek(0)
        status = "ok" if proc.returncode == 0 else f"exit {proc.returncode}: {log.read().strip()[-200:]}"
        if seconds >= timeout:
            status = "timeout"
        results = Path(out) / "results.csv"
        if status == "ok" and results.exists():
            with results.open() as f:
                rows = list(csv.DictReader(f))
            bad = [r for r in rows if r.get("status", "ok") != "ok"]
            if bad:
                status = f"attack {bad[0]['status']}: {bad[0].get('error', '')[:120]}"
    return usage.ru_maxrss * 1024, seconds, status  # ru_maxrss is in KiB on Linux


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated: run the configurations whose label "
                                                   "contains one of these")
    parser.add_argument("--src", default=str(ROOT), help="tree whose fedsim the runs use")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per run")
    parser.add_argument("--all", action="store_true", help="also the slower configurations (MORE)")
    parser.add_argument("--json", default="", help="write the table here")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="fedsim-cache-") as cache:
        models = cache_dir()
        models.mkdir(parents=True, exist_ok=True)  # pre-trained on first use
        (Path(cache) / "models").symlink_to(models, target_is_directory=True)
        print(f"{'config':28} {'estimate':>9} {'measured':>9} {'est/meas':>8} {'s':>5}  status")
        for label, values in CONFIGS + (MORE if args.all else []):
            if args.only and not any(part in label for part in args.only.split(",")):
                continue
            values = {**FIXED, **values}
            est = estimate(RunConfig(**{k: v for k, v in values.items() if v is not None}))
            peak, seconds, status = measure(values, Path(args.src), Path(cache), args.timeout)
            ratio = est.total / peak if peak else float("nan")
            rows.append({"config": label, "estimate_gib": round(est.total / GiB, 2),
                         "measured_gib": round(peak / GiB, 2), "ratio": round(ratio, 2),
                         "seconds": round(seconds, 1), "status": status, "estimate": est.describe()})
            print(f"{label:28} {est.total / GiB:8.2f}G {peak / GiB:8.2f}G {ratio:8.2f} {seconds:5.0f}  {status}",
                  flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
