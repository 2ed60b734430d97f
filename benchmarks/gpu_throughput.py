"""Per-client throughput of one 16-client round with the tiny CLIP: GPU against CPU.

For each device and batch size, the clients' world is built once (`fedsim.harness.Setting`: data,
model, defense), one client's update warms it up, then each of the 16 clients' round-1 updates
is computed as its ClientApp computes it (`Setting.client_update`: seeded batch -> Task.gradients
-> defense -> update, copied back to the CPU, which waits for the GPU). The figure is the median
over `--repeats` rounds: seconds per client and client updates per second. `--run` also times a
whole 16-client `fedsim run --engine inprocess --attack none` on each device (Flower's messages,
the server's step and its evaluation of the global model included; timings.json's split).

    PYTHONPATH=. .venv/bin/python benchmarks/gpu_throughput.py                       # cpu, and cuda if present
    PYTHONPATH=. .venv/bin/python benchmarks/gpu_throughput.py --devices cuda cpu --run --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from fedsim.config import RunConfig
from fedsim.harness import Setting


def round_seconds(setting: Setting, clients: int, repeats: int) -> list[float]:
    """Wall time of `repeats` rounds of every client's update at the initial global model."""
    params = {n: p.detach().cpu() for n, p in setting.task.trainable().items()}  # as Flower hands them over
    setting.client_update(1, 0, params)  # warm-up: kernels, caches, the first batch
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for client in range(clients):
            setting.client_update(1, client, params)  # returns CPU tensors: the GPU's work is done
        times.append(time.perf_counter() - start)
    return times


def whole_run(cfg: RunConfig) -> dict:
    """A whole in-process run without attacks: its wall time and timings.json."""
    from rich.console import Console

    from fedsim.runner import run

    with tempfile.TemporaryDirectory() as out:
        cfg.out, cfg.overwrite = str(Path(out) / "run"), True
        start = time.perf_counter()
        with open(Path(out) / "log.txt", "w") as log:
            result = run(cfg, console=Console(file=log))
        return {"wall_s": time.perf_counter() - start, **result.timings}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", nargs="+", default=["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"],
                        choices=("cpu", "cuda"))
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--peft", default="coop")
    parser.add_argument("--defense", default="none", help="e.g. dp: per-example gradients through vmap")
    parser.add_argument("--pretrained", default="fedsim", help="fedsim (the cached pre-trained tiny CLIP) or none")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="CPU threads for torch; 0 = torch's default")
    parser.add_argument("--run", action="store_true", help="also time a whole in-process run on each device")
    parser.add_argument("--json", metavar="PATH", help="write the figures to this JSON file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    figures = {"clients": args.clients, "peft": args.peft, "defense": args.defense, "model": "tiny-clip",
               "pretrained": args.pretrained, "repeats": args.repeats, "cpu_threads": torch.get_num_threads(),
               "torch": torch.__version__, "cuda": torch.version.cuda,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None, "rows": []}
    print(f"tiny CLIP + {args.peft}, defense {args.defense}, {args.clients} clients, round 1; "
          f"CPU threads {torch.get_num_threads()}; GPU {figures['gpu']}")
    print(f"{'device':>6} {'batch':>5} {'s/client':>10} {'clients/s':>10} {'images/s':>10}"
          + (f" {'run wall s':>10} {'run client s':>12}" if args.run else ""))
    for batch in args.batch_sizes:
        for device in args.devices:
            if device == "cuda" and not torch.cuda.is_available():
                print("  cuda: skipped, CUDA is not available here")
                continue
            cfg = RunConfig(clients=args.clients, batch_size=batch, peft=args.peft, defense=args.defense,
                            pretrained=args.pretrained, attack="none", engine="inprocess", device=device)
            times = round_seconds(Setting(cfg, device=device), args.clients, args.repeats)
            per_client = statistics.median(times) / args.clients
            row = {"device": device, "batch_size": batch, "round_s": times, "s_per_client": per_client,
                   "clients_per_s": 1 / per_client, "images_per_s": batch / per_client}
            line = f"{device:>6} {batch:5d} {per_client:10.4f} {1 / per_client:10.1f} {batch / per_client:10.1f}"
            if args.run:
                row["run"] = whole_run(cfg)
                line += f" {row['run']['wall_s']:10.2f} {row['run']['client_compute_s']:12.2f}"
            figures["rows"].append(row)
            print(line, flush=True)
        rows = {r["device"]: r for r in figures["rows"] if r["batch_size"] == batch}
        if {"cpu", "cuda"} <= set(rows):
            speedup = rows["cpu"]["s_per_client"] / rows["cuda"]["s_per_client"]
            figures.setdefault("gpu_speedup", {})[str(batch)] = speedup
            print(f"  batch {batch}: GPU {speedup:.2f} x the CPU's per-client throughput")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
