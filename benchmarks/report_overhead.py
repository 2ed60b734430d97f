"""What writing report.html adds to a run: the page's build time against the run's wall time,
and the page's size (issue targets: at most 5 % of a default run, at most 5 MB for 10 clients).

    PYTHONPATH=. .venv/bin/python benchmarks/report_overhead.py            # the default run, 10 clients
    PYTHONPATH=. .venv/bin/python benchmarks/report_overhead.py --clients 3 --attack dlg --model lenet --peft full
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console

from fedsim.config import RunConfig
from fedsim.pages import write_run_page
from fedsim.runner import run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--attack", default="mip")
    parser.add_argument("--model", default="tiny-clip")
    parser.add_argument("--peft", default="coop")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    out = Path(tempfile.mkdtemp()) / "run"
    start = time.perf_counter()
    result = run(RunConfig(clients=args.clients, attack=args.attack, model=args.model, peft=args.peft,
                           engine="inprocess", out=str(out)), console=Console(quiet=True))
    wall = time.perf_counter() - start  # the whole run, its page included
    page_seconds = []
    for _ in range(args.repeats):
        t = time.perf_counter()
        write_run_page(out)
        page_seconds.append(time.perf_counter() - t)
    page = statistics.median(page_seconds)
    print(f"run wall time {wall:.1f} s (page included); page {page:.2f} s = {page / (wall - page):.1%} of the run "
          f"without it; report.html {result.report.stat().st_size / 1e6:.2f} MB for {args.clients} clients")


if __name__ == "__main__":
    main()
