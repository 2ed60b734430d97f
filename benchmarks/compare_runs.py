"""Do two runs give the same figures? Compares two run directories' results.csv row by row,
matched on (round, client, attack), and prints the largest difference of every metric.

Rows are matched rather than read in order because Flower hands replies to the server in the
order the clients finish, which differs from run to run. Used to check that a refactoring left
`fedsim run`'s results unchanged:

    git worktree add /tmp/before <old commit>
    (cd /tmp/before && PYTHONPATH=. ../main/.venv/bin/python -m fedsim.cli run --engine inprocess --out /tmp/a)
    fedsim run --engine inprocess --out /tmp/b
    python benchmarks/compare_runs.py /tmp/a /tmp/b
"""

from __future__ import annotations

import argparse
from pathlib import Path

import pandas as pd

KEYS = ["round", "client", "attack"]
METRICS = ["label_acc", "mse", "psnr", "ssim", "lpips", "ident_pixel", "ident_feature", "emb_cos",
           "emb_cos_centred", "epsilon", "epsilon_client"]


def compare(a: Path, b: Path) -> pd.DataFrame:
    """Per metric: the largest absolute difference and the medians of both runs."""
    left, right = (pd.read_csv(Path(d) / "results.csv").set_index(KEYS).sort_index() for d in (a, b))
    if not left.index.equals(right.index):
        raise SystemExit(f"the runs attacked different updates: {sorted(set(left.index) ^ set(right.index))}")
    metrics = [m for m in METRICS if m in left and m in right and left[m].notna().any()]
    return pd.DataFrame({"max_abs_diff": (left[metrics] - right[metrics]).abs().max(),
                         "median_a": left[metrics].median(), "median_b": right[metrics].median()})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("a", type=Path)
    parser.add_argument("b", type=Path)
    args = parser.parse_args()
    print(compare(args.a, args.b).to_string(float_format=lambda v: f"{v:.6g}"))
    for name in ("metrics.csv",):
        left, right = (pd.read_csv(d / name) for d in (args.a, args.b))
        shared = [c for c in left if c in right]
        print(f"{name}: largest difference {float((left[shared] - right[shared]).abs().max().max()):.3g}")


if __name__ == "__main__":
    main()
