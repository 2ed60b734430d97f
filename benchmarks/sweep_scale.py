"""How fast `fedsim sweep` checks a large grid, and how fast it refuses one past its bound.

    PYTHONPATH=. .venv/bin/python benchmarks/sweep_scale.py

Writes two grid files (10^4 trials, the bound; 10^6 trials, past it) to a temporary folder and
times `fedsim.grid.load_grid` on each: the first is expanded and every trial validated, the
second is counted before any expansion and refused with its count.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import yaml

from fedsim.config import ConfigError
from fedsim.grid import MAX_TRIALS, load_grid

TEN = list(range(10))


def grid(axes: int) -> dict:
    names = ["seed", "attack_seed", "model_seed", "local_steps", "rounds", "clients"][:axes]
    values = {name: [v + 1 if name in ("local_steps", "rounds", "clients") else v for v in TEN] for name in names}
    return {"base": {"model": "lenet", "peft": "full", "attack": "dlg"}, "grid": values}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        for axes in (4, 6):
            path = Path(tmp) / f"grid{axes}.yaml"
            path.write_text(yaml.safe_dump(grid(axes)))
            start = time.perf_counter()
            try:
                outcome = f"{len(load_grid(path).trials):,} trials checked"
            except ConfigError as exc:
                outcome = f"refused: {exc}"
            print(f"10^{axes} trials (bound {MAX_TRIALS:,}): {time.perf_counter() - start:.2f} s; {outcome}")


if __name__ == "__main__":
    main()
