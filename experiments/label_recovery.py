"""Label recovery from gradients on untrained models: iDLG, GradInversion, iLRG and LLG.

Three measurements, each on every --models x --datasets pair it applies to:
- idlg: batch 1, --images images, label accuracy (target: 100 % on LeNet, digits and faces).
- gradinversion: batch 8 with 8 distinct labels, --batches batches, label accuracy = multiset
  overlap (`fedsim.evaluate.label_accuracy`) (target: >= 99 % on LeNet and ConvNet, digits).
  Needs at least 8 classes, so it skips faces.
- ilrg and llg: batch 16, labels drawn uniformly at random with repetition from all classes,
  --batches batches (target for iLRG on digits: exact per-class counts in >= 95 % of batches,
  LeAcc >= 99 %).

Metrics per batch: `label_acc` (multiset overlap; iLRG's "IRec"), `counts_exact` (the predicted
per-class counts equal the true ones), `set_exact` (the set of predicted classes equals the
true set), `leacc` and `lnacc` as iLRG's reference code computes them (BUAA-CST/iLRG,
utils.get_irlg_res): the share of the C classes whose presence / whose count is predicted right.

Diagnostics (they read the true batch, so they are not attacks; they explain failures):
- gradinversion: `positive_min`, the present classes whose gradient row minimum is >= 0,
  i.e. where the rule's assumption fails;
- ilrg: `oracle_exact`, iLRG's linear system and rounding fed the true per-class mean softmax
  instead of the estimate from the class embeddings; `top_prob`, the largest batch-mean
  softmax probability of any class; `min_bias_grad`, min over classes of |B db_j| (iLRG's
  class embedding divides by db_j; this one the server can see).

`--reinit-classifier` is an ablation: the classifier of the untrained model gets PyTorch's
default init (LeNet's U(-0.5, 0.5) gives large logits and uneven class probabilities).

Updates are made by the client's own code (`fedsim.harness.Setting.observe_examples`, no
defense) from the untrained global model; `--protocol fedavg --local-steps N` sends weight deltas
instead.

    PYTHONPATH=. .venv/bin/python experiments/label_recovery.py --models lenet convnet \
        --datasets digits faces --images 100 --batches 50 --seed 0 --out runs/label_recovery
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from attacks.labels import (
    LabelStrategyError,
    last_linear_layer,
    layer_gradient,
    recover_labels,
    round_counts,
    solve_counts,
)
from fedsim.api import Observation
from fedsim.config import CLASSIC_MODELS, RunConfig
from fedsim.evaluate import label_accuracy
from fedsim.harness import Setting
from fedsim.models import derive_seed

TARGETS = {  # (strategy, metric): target mean, from the issue
    ("idlg", "label_acc"): 1.0,
    ("gradinversion", "label_acc"): 0.99,
    ("ilrg", "counts_exact"): 0.95,
    ("ilrg", "leacc"): 0.99,
}


class Pool:
    """One model on one dataset (the harness's Setting, untrained, on CPU) and its private pool."""

    def __init__(self, model: str, dataset: str, args: argparse.Namespace):
        peft = "full" if model in CLASSIC_MODELS else args.peft
        cfg = RunConfig(model=model, dataset=dataset, peft=peft, pretrained=args.pretrained,
                        protocol=args.protocol, local_steps=args.local_steps, lr=args.lr,
                        synthetic_classes=args.synthetic_classes, synthetic_size=args.synthetic_size,
                        seed=args.seed, model_seed=args.seed)  # --seed seeds the model's init too, as before
        self.setting, self.model, self.dataset = Setting(cfg, device="cpu"), model, dataset
        self.task = self.setting.task
        if args.reinit_classifier:
            module = self.task.model.get_submodule(last_linear_layer(self.task).weight.rsplit(".", 1)[0])
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(args.seed)
                module.reset_parameters()
        self.params = self.task.trainable()
        self.images, self.labels = self.setting.data.private.images, self.setting.data.private.labels
        self.num_classes = self.task.num_classes
        self.by_class = [np.flatnonzero(self.labels.numpy() == c) for c in range(self.num_classes)]

    def observe(self, idx: np.ndarray) -> Observation:
        """The update a client holding these private images would send, as the server sees it."""
        return self.setting.observe_examples(self.images[idx], self.labels[idx], self.params)

    def pick(self, labels, rng: np.random.Generator) -> np.ndarray:
        """One image of each wanted label, no image twice."""
        idx = []
        for c in labels:
            pool = np.setdiff1d(self.by_class[c], idx)
            idx.append(int(rng.choice(pool)))
        return np.array(idx)


def batch_metrics(pred: torch.Tensor, true: torch.Tensor, classes: int) -> dict[str, float]:
    p, t = torch.bincount(pred, minlength=classes), torch.bincount(true, minlength=classes)
    return {"label_acc": label_accuracy(pred, true),
            "counts_exact": float(torch.equal(p, t)),
            "set_exact": float(torch.equal(p > 0, t > 0)),
            "leacc": float(((p > 0) == (t > 0)).double().mean()),
            "lnacc": float((p == t).double().mean())}


def run_strategy(pool: Pool, strategy: str, idx: np.ndarray, obs: Observation) -> dict:
    true = pool.labels[idx]
    row = {"model": pool.model, "dataset": pool.dataset, "strategy": strategy, "batch_size": len(idx),
           "true": " ".join(map(str, sorted(true.tolist())))}
    start = time.perf_counter()
    try:
        pred = recover_labels(strategy, obs, pool.task)
    except LabelStrategyError as exc:
        return {**row, "error": str(exc)}
    row["seconds"] = time.perf_counter() - start
    row["predicted"] = " ".join(map(str, sorted(pred.tolist())))
    return {**row, **batch_metrics(pred, true, pool.num_classes)}


def positive_min(pool: Pool, idx: np.ndarray, obs: Observation) -> int:
    """Present classes whose weight-gradient row minimum is >= 0 (GradInversion cannot see them)."""
    _, weight, _ = layer_gradient(obs, pool.task, "gradinversion")
    return int(sum(weight[c].min() >= 0 for c in set(pool.labels[idx].tolist())))


def ilrg_diagnostics(pool: Pool, idx: np.ndarray, obs: Observation) -> dict[str, float]:
    """iLRG's steps 3-4 with the true per-class mean softmax in place of its estimate; the
    largest batch-mean class probability; min_j |B db_j| (iLRG divides by db_j)."""
    _, _, bias_grad = layer_gradient(obs, pool.task, "ilrg", need_bias=True)
    images, labels = pool.images[idx], pool.labels[idx]
    with torch.no_grad():
        probs = pool.task.logits(pool.params, images).double().softmax(1)
    mean = probs.mean(0)
    per_class = torch.stack([probs[labels == c].mean(0) if (labels == c).any() else mean
                             for c in range(pool.num_classes)])
    counts = round_counts(solve_counts(per_class, bias_grad, len(idx)), len(idx))
    return {"oracle_exact": float(torch.equal(counts, torch.bincount(labels, minlength=pool.num_classes))),
            "top_prob": float(mean.max()), "min_bias_grad": float((len(idx) * bias_grad).abs().min())}


def measure_idlg(pool: Pool, images: int, rng: np.random.Generator) -> list[dict]:
    rows = []
    for trial, i in enumerate(rng.choice(len(pool.labels), size=images, replace=False)):
        idx = np.array([i])
        rows.append({"part": "batch 1", "trial": trial, **run_strategy(pool, "idlg", idx, pool.observe(idx))})
    return rows


def measure_gradinversion(pool: Pool, batches: int, rng: np.random.Generator, size: int = 8) -> list[dict]:
    rows = []
    for trial in range(batches):
        idx = pool.pick(rng.choice(pool.num_classes, size=size, replace=False), rng)
        obs = pool.observe(idx)
        row = run_strategy(pool, "gradinversion", idx, obs)
        rows.append({"part": f"batch {size} distinct", "trial": trial, **row,
                     "positive_min": positive_min(pool, idx, obs)})
    return rows


def measure_repeated(pool: Pool, batches: int, rng: np.random.Generator, size: int = 16) -> list[dict]:
    rows = []
    for trial in range(batches):
        idx = pool.pick(rng.integers(pool.num_classes, size=size), rng)
        obs = pool.observe(idx)
        part = {"part": f"batch {size} repeated", "trial": trial}
        rows.append({**part, **run_strategy(pool, "ilrg", idx, obs), **ilrg_diagnostics(pool, idx, obs)})
        rows.append({**part, **run_strategy(pool, "llg", idx, obs)})
    return rows


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    metrics = ["label_acc", "counts_exact", "set_exact", "leacc", "lnacc", "positive_min", "oracle_exact",
               "top_prob", "min_bias_grad", "seconds"]
    present = [m for m in metrics if m in rows]
    keys = ["part", "model", "dataset", "strategy"]
    table = rows.groupby(keys, sort=False)[present].mean()
    table.insert(0, "n", rows.groupby(keys, sort=False).size())
    table["target"] = [", ".join(f"{m} >= {v:.0%}" for (s, m), v in TARGETS.items() if s == key[3])
                       for key in table.index]
    return table.reset_index()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["lenet", "convnet"])
    parser.add_argument("--datasets", nargs="+", default=["digits", "faces"])
    parser.add_argument("--synthetic-classes", type=int, default=10, help="for --datasets synthetic")
    parser.add_argument("--synthetic-size", type=int, default=100, help="for --datasets synthetic")
    parser.add_argument("--peft", default="linear-probe", help="PEFT method for CLIP models (classic: full)")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--images", type=int, default=100, help="batch-1 images for iDLG")
    parser.add_argument("--batches", type=int, default=50, help="batches for the batch-8 and batch-16 parts")
    parser.add_argument("--protocol", default="fedsgd", choices=["fedsgd", "fedavg"])
    parser.add_argument("--local-steps", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--reinit-classifier", action="store_true",
                        help="ablation: PyTorch's default init for the classifier layer")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/label_recovery")
    args = parser.parse_args()

    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for model in args.models:
        for dataset in args.datasets:
            pool = Pool(model, dataset, args)
            rng = np.random.default_rng(derive_seed(args.seed, model, dataset, "label recovery"))
            rows += measure_idlg(pool, args.images, rng)
            if pool.num_classes >= 8:
                rows += measure_gradinversion(pool, args.batches, rng)
            rows += measure_repeated(pool, args.batches, rng)
            print(f"{model} / {dataset}: done", flush=True)
    frame = pd.DataFrame(rows)
    frame.to_csv(out / "results.csv", index=False)
    table = summarise(frame)
    table.to_csv(out / "summary.csv", index=False)
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.precision", 3):
        print(table.to_string(index=False))
    if "error" in frame and frame["error"].notna().any():
        print("errors:", *frame["error"].dropna().unique(), sep="\n  ")
    print(f"wrote {out / 'results.csv'} and {out / 'summary.csv'}")


if __name__ == "__main__":
    main()
