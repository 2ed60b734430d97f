"""Privacy against utility for every defense at several strengths: attack quality of each attack
(PSNR, SSIM, label accuracy, identifiability) next to the global accuracy the defense leaves.

    OMP_NUM_THREADS=1 .venv-own/bin/python experiments/defense_tradeoff.py --attacks dlg \\
        --images 1 --attack-iters 40 --rounds 20 --out runs/defense_tradeoff_dlg
    OMP_NUM_THREADS=1 .venv-own/bin/python experiments/defense_tradeoff.py --attacks dlg,ig \\
        --defenses dp,prune --strengths dp=1.0 prune=0.9 --images 4 --out runs/defense_key

Privacy: `--images` clients each send the FedSGD update of one image (batch 1, the attacks'
best case), produced by the real client path (`fedsim.harness.Setting.observe`, defense chain
included); every attack, taken by plugin name (`--attacks dlg,ig,mip`) and built from the
server's knowledge, reconstructs it and the harness's Scorer scores it against the true image
(identifiability against a gallery of public images). `--attack-iters` gives every attack, or
each one named, its iterations; an attack it does not name keeps its own default. Under
`secagg` the strength is the number of clients in the aggregate the server sees; the attack
reconstructs all their images from the averaged update, formed here from the clients' updates
(`fedsim.harness.aggregate`): what Flower's SecAgg+ hands the server in a
`fedsim run --defense secagg`, up to its quantisation (at most 2 * clip / 2^22 per entry).
Two no-information baselines per attack: the reconstruction from a zero update and from a
random Gaussian one of the undefended update's norm (`baseline` rows): a defense that brings
an attack down to them leaves it nothing.
Utility: a separate in-process fedsim run per setting, no attack, FedAvg (`--rounds`,
`--clients`, `--local-steps` SGD steps on batches of `--utility-batch`), global accuracy on
the held-out public split after the last round, and epsilon where the defense has one.
`--seed` seeds the data, the model's initialisation and the attacks.

Writes results.csv (one row per attack, setting and image), summary.csv (medians per attack and
setting, with utility and epsilon) and tradeoff_<attack>.png (utility on x, attack PSNR on y,
one line per defense through its strengths, the baselines as horizontal lines).
"""

from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from rich.console import Console  # noqa: E402

from defenses.base import update_norm  # noqa: E402
from fedsim.config import RunConfig  # noqa: E402
from fedsim.harness import Scorer, Setting, Truth, aggregate  # noqa: E402
from fedsim.runner import run  # noqa: E402

# defense -> (option its strength sets, strengths from weak to strong, fixed options)
GRID = {
    "dp": ("dp_noise", [0.0, 1e-4, 1e-3, 1e-2, 1.0], {"dp_clip": 1.0}),
    "dp-update": ("update_noise", [1e-4, 1e-3, 1e-2, 1.0], {"update_clip": 1.0}),
    "prune": ("prune_ratio", [0.2, 0.5, 0.7, 0.9, 0.99], {}),
    "quantize": ("quantize_bits", [8, 4, 2, 1], {"quantize_mode": "stochastic"}),
    "soteria": ("soteria_ratio", [0.2, 0.4, 0.6, 0.8], {}),
    "secagg": ("clients", [2, 4], {}),
}


def settings(defenses: list[str], chosen: dict[str, list[float]]):
    yield "none", None, {}
    for name in defenses:
        field, strengths, fixed = GRID[name]
        for s in chosen.get(name, strengths):
            yield name, s, {"defense": name, field: s, **fixed} if name != "secagg" else {"defense": name}


def key(defense: str, strength) -> tuple[str, str]:
    """A setting's identity, the same whether its strength is a number or was read back from a CSV."""
    missing = strength is None or str(strength) in ("nan", "None")
    return defense, "-" if missing else f"{float(strength):g}"


def observations(setting: Setting, images: int, aggregate_of: int):
    """(observation, truth) per attacked update: one per client, or under secure aggregation one
    per group of `aggregate_of` clients."""
    for first in range(0, images, aggregate_of):
        clients = tuple(range(first, first + aggregate_of))
        group = [setting.observe(1, c)[0] for c in clients]
        yield (aggregate(group) if aggregate_of > 1 else group[0]), setting.truth(1, clients)


def attack_row(attack, obs, truth: Truth, scorer: Scorer) -> dict:
    start = time.perf_counter()
    recon = attack.reconstruct(obs, scorer.task)
    metrics, _ = scorer.score(obs, recon, truth)
    return {**metrics, "attack_seconds": round(time.perf_counter() - start, 2)}


def utility(base: RunConfig, overrides: dict, args, out: Path) -> dict:
    overrides = {k: v for k, v in overrides.items() if k != "clients"}
    cfg = RunConfig(**{**base.to_dict(), **overrides, "attack": "none", "engine": "inprocess",
                       "protocol": "fedavg", "clients": args.clients, "rounds": args.rounds,
                       "local_steps": args.local_steps, "batch_size": args.utility_batch,
                       "lr": args.utility_lr, "out": str(out), "overwrite": True})
    metrics = run(cfg, console=Console(quiet=True)).metrics.iloc[-1]
    return {"accuracy": metrics["accuracy"], **{k: metrics[k] for k in ("epsilon", "epsilon_client") if k in metrics}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attacks", default="dlg,ig", help="comma-separated attack plugins")
    parser.add_argument("--defenses", default=",".join(GRID), help=f"comma-separated, from {', '.join(GRID)}")
    parser.add_argument("--model", default="lenet")
    parser.add_argument("--peft", default="", help="PEFT method (default: full for classic models, coop for CLIP)")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--images", type=int, default=4, help="attacked updates (clients) per setting")
    parser.add_argument("--attack-iters", default="30", help="iterations of every attack (30), or per attack "
                        "(dlg=40,ig=1000; an attack not named keeps its own default)")
    parser.add_argument("--rounds", type=int, default=10, help="utility: FedAvg rounds")
    parser.add_argument("--clients", type=int, default=4, help="utility: clients, all sampled each round")
    parser.add_argument("--local-steps", type=int, default=5, help="utility: local SGD steps per round")
    parser.add_argument("--utility-batch", type=int, default=16, help="utility: batch per local step")
    parser.add_argument("--utility-lr", type=float, default=0.1)
    parser.add_argument("--strengths", nargs="*", default=[], metavar="DEFENSE=S1,S2",
                        help="replace a defense's strengths, e.g. dp=1.0 prune=0.9")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skip-utility", default="", help="comma-separated defenses whose utility run is skipped "
                        "(NaN): soteria's Jacobian in every local step makes its run long on a CPU")
    parser.add_argument("--resume", action="store_true", help="keep the settings already in --out's summary.csv")
    parser.add_argument("--out", default="runs/defense_tradeoff")
    args = parser.parse_args()
    chosen = {}
    for item in args.strengths:
        name, _, values = item.partition("=")
        if name not in GRID or not values:
            parser.error(f"--strengths {item!r}: expected DEFENSE=S1,S2 with DEFENSE one of {', '.join(GRID)}")
        kind = type(GRID[name][1][0])
        chosen[name] = [kind(v) for v in values.split(",")]
    torch.set_num_threads(1)
    attacks = [a.strip() for a in args.attacks.split(",")]
    iters = {}
    for item in args.attack_iters.split(","):
        name, _, value = item.rpartition("=")
        iters.update({name: int(value)} if name else {a: int(value) for a in attacks})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    peft = args.peft or ("full" if args.model in ("lenet", "convnet", "resnet18") else "coop")
    base = RunConfig(model=args.model, peft=peft, dataset=args.dataset, batch_size=1, seed=args.seed,
                     model_seed=args.seed, attack_seed=args.seed, clients=max(args.images, 4))
    rows, summary, done = [], [], set()
    if args.resume and (out / "summary.csv").exists():
        summary = pd.read_csv(out / "summary.csv").to_dict("records")
        done = {key(r["defense"], r["strength"]) for r in summary}
        rows = [r for r in pd.read_csv(out / "results.csv").to_dict("records")
                if r["defense"] == "baseline" or key(r["defense"], r["strength"]) in done]
    for defense, strength, overrides in settings([d.strip() for d in args.defenses.split(",")], chosen):
        if key(defense, strength) in done:
            continue
        s = Setting(RunConfig(**{**base.to_dict(), **overrides}), device="cpu")
        scorer, built = s.scorer(), {a: s.attack(attack=a, attack_iters=iters.get(a)) for a in attacks}
        group = strength if defense == "secagg" else 1
        images = group * max(1, args.images // group)
        setting = {"defense": defense, "strength": strength}
        first_row = len(rows)
        for obs, truth in observations(s, images, group):
            for attack in attacks:
                rows.append({**setting, "attack": attack, "client": obs.client,
                             **attack_row(built[attack], obs, truth, scorer)})
                print(f"{defense} {strength} {attack} client {obs.client}: PSNR {rows[-1]['psnr']:.2f}", flush=True)
            if defense == "none":  # the no-information baselines, once per image
                norm = float(update_norm(obs.update))
                g = torch.Generator().manual_seed(obs.client)
                noise = {n: torch.randn(u.shape, generator=g) for n, u in obs.update.items()}
                scale = norm / float(update_norm(noise))
                for kind, update in (("zero", {n: torch.zeros_like(u) for n, u in obs.update.items()}),
                                     ("random", {n: u * scale for n, u in noise.items()})):
                    fake = dataclasses.replace(obs, update=update)
                    for attack in attacks:
                        rows.append({"defense": "baseline", "strength": kind, "attack": attack, "client": obs.client,
                                     **attack_row(built[attack], fake, truth, scorer)})
            pd.DataFrame(rows).to_csv(out / "results.csv", index=False)
        if defense in args.skip_utility.split(","):
            use = {"accuracy": float("nan")}  # not measured: said in the summary as NaN
        elif defense != "secagg":  # secagg changes what the server sees, not the global model
            use = utility(base, overrides, args, out / "utility" / f"{defense}_{strength}")
        else:
            use = {"accuracy": summary[0]["accuracy"]}
        print(f"{defense} {strength}: utility {use}", flush=True)
        for attack in attacks:
            g = pd.DataFrame(rows[first_row:])
            g = g[(g.defense == defense) & (g.attack == attack)]
            summary.append({**setting, "attack": attack, **use, "psnr": g.psnr.median(), "ssim": g.ssim.median(),
                            "label_acc": g.label_acc.mean(), "ident_pixel": g.ident_pixel.mean(), "n": len(g)})
        pd.DataFrame(summary).to_csv(out / "summary.csv", index=False)
    results, table = pd.DataFrame(rows), pd.DataFrame(summary)
    baseline = results[results.defense == "baseline"].groupby(["attack", "strength"]).psnr.median()
    for attack in attacks:
        plot(table[table.attack == attack], baseline[attack], attack, out / f"tradeoff_{attack}.png")
    print(table.to_string(index=False))
    print("no-information baselines (median PSNR):", baseline.round(2).to_dict())
    print(f"wrote {out}")


def plot(table: pd.DataFrame, baseline: pd.Series, attack: str, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for defense, g in table.groupby("defense", sort=False):
        ax.plot(g.accuracy, g.psnr, "o-" if defense != "none" else "k*", ms=9 if defense == "none" else 5,
                label=defense)
        for _, r in g.iterrows():
            if defense != "none":
                ax.annotate(f"{r.strength:g}", (r.accuracy, r.psnr), fontsize=7, xytext=(3, 3),
                            textcoords="offset points")
    for kind, value in baseline.items():
        ax.axhline(value, ls=":" if kind == "zero" else "--", color="grey", lw=1, label=f"{kind} update")
    ax.set_xlabel("utility: global accuracy after the last round")
    ax.set_ylabel(f"{attack} PSNR (dB, median; higher = more leaked)")
    ax.set_title(f"{attack}: privacy against utility per defense and strength")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


if __name__ == "__main__":
    main()
