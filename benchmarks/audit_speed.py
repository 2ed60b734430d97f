"""The audit of one client against the attack it predicts, on the same setting, in one run.

For each setting and client: `fedsim.audit.audit` for that client alone (its batch, the
perturbation, the Jacobian products, lambda_max and the CG solve: what `fedsim audit` does per
client) against the attack's `reconstruct` at the attack's own default iterations on the same
client's observation, timed alternately in one process. Issue 16's target: audit / attack <= 1/20.

    PYTHONPATH=. .venv/bin/python benchmarks/audit_speed.py
    PYTHONPATH=. .venv/bin/python benchmarks/audit_speed.py --settings ig-convnet --clients 1  # IG: 24,000 steps
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from fedsim.audit import audit
from fedsim.config import RunConfig
from fedsim.harness import Setting

SETTINGS = {
    "dlg-lenet": dict(model="lenet", peft="full", attack="dlg"),
    "ig-convnet": dict(model="convnet", peft="full", attack="ig"),
    "mip-adapter": dict(peft="adapter", attack="mip"),
    "mip-coop": dict(peft="coop", attack="mip"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=["dlg-lenet", "mip-adapter",
                                                                                    "mip-coop"])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--noise", type=float, default=1e-3, help="--audit-noise of the audit")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    for name in args.settings:
        setting = Setting(RunConfig(clients=args.clients, **SETTINGS[name]), device="cpu")
        attack = setting.attack()
        obs, _ = setting.observe(1, 0)  # warm-up, untimed: the data, the model, MIP's decoder
        audit(setting, noise=args.noise, clients=[0])
        attack.reconstruct(obs, setting.task)
        audits, attacks = [], []
        for client in range(args.clients):
            start = time.perf_counter()
            audit(setting, noise=args.noise, clients=[client])
            audits.append(time.perf_counter() - start)
            obs, _ = setting.observe(1, client)
            start = time.perf_counter()
            attack.reconstruct(obs, setting.task)
            attacks.append(time.perf_counter() - start)
        a, b = statistics.median(audits), statistics.median(attacks)
        print(f"{name}: audit of one client {a:.2f} s, {SETTINGS[name]['attack']} at its default iterations "
              f"{b:.2f} s (medians of {args.clients}): ratio 1/{b / a:.1f} "
              f"({'meets' if a * 20 <= b else 'misses'} 1/20)", flush=True)


if __name__ == "__main__":
    main()
