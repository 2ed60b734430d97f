"""MIP's batch label search on CoOp (pre-trained tiny CLIP, digits): is the label multiset of a
batch exactly right, and by what margin did it win?

Two kinds of batches, each update from the real client code through the harness
(`experiments/mip_tiny.py` helpers):
- `--labels distinct`: the batches of `mip_tiny.py --part recovery` (distinct labels, the
  issue's target; the same seeds, so `--first 20` checks batches that part does not score);
- `--labels repeated`: random batches that repeat at least one label (the attack is never
  told which kind it faces).
`--first` skips that many batches of the kind, so a long run can be split across processes.

Prints each batch (true and found labels, the winning residual and the best other set's) and
writes <out>/labels_<kind>.csv.

    PYTHONPATH=. .venv/bin/python experiments/mip_labels.py --labels repeated --batches 8 --out runs/mip
    PYTHONPATH=. .venv/bin/python experiments/mip_labels.py --labels distinct --first 20 --batches 8 --out runs/mip
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pandas as pd
import torch

from experiments.mip_tiny import batches, observe, setting

BATCH = 4


def label_batches(data, kind: str, first: int, n: int, seed: int):
    """(index in its stream, image indices) of n batches of the given kind."""
    if kind == "distinct":  # the recovery part's stream, skipping its first `first` batches
        stream = enumerate(batches(data, first + n, BATCH, seed + BATCH, True))
        yield from ((k, idx) for k, idx in stream if k >= first)
        return
    found = 0  # the stream's repeated-label batches seen so far
    for k, idx in enumerate(batches(data, 100 * (first + n), BATCH, seed + 99, False)):
        if len(set(data.private.labels[idx].tolist())) < BATCH:
            found += 1
            if found > first:
                yield k, idx
            if found == first + n:
                return


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--labels", choices=["distinct", "repeated"], default="repeated")
    parser.add_argument("--first", type=int, default=0, help="skip this many batches of the kind")
    parser.add_argument("--batches", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/mip")
    args = parser.parse_args()
    torch.set_num_threads(1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    s = setting("coop", args.seed)
    attack = s.attack()
    rows = []
    for k, idx in label_batches(s.data, args.labels, args.first, args.batches, args.seed):
        obs, truth = observe(s, idx, k)
        start = time.perf_counter()
        found, _, info = attack.recover_embeddings(obs, s.task)
        row = {"index": k, "labels": sorted(truth.labels.tolist()), "found": sorted(found.tolist()),
               "residual": info["relative_residual"], "runner_up": info.get("runner_up_residual"),
               "seconds": time.perf_counter() - start}
        row["exact"] = row["labels"] == row["found"]
        rows.append(row)
        print(f"#{k} {row['labels']} -> {row['found']} {'right' if row['exact'] else 'WRONG'}: residual "
              f"{row['residual']:.1e}, best other set {row['runner_up']:.1e} ({row['seconds']:.0f} s)", flush=True)
        pd.DataFrame(rows).to_csv(out / f"labels_{args.labels}.csv", index=False)
    df = pd.DataFrame(rows)
    print(f"{args.labels} labels: exactly right {df.exact.sum()} of {len(df)}; median {df.seconds.median():.0f} s "
          f"per batch; median margin (best other / winner) {(df.runner_up / df.residual).median():.0f}x")


if __name__ == "__main__":
    main()
