"""Attack speed on CPU in a worker thread vs the main thread, with 1 and 2 torch threads.

Flower calls the strategy, and so the attacks, from a worker thread. This compares DLG on the
default tiny-CLIP/CoOp setting in both places (ratios within one run; machines are noisy):

    .venv/bin/python benchmarks/thread_pool.py
"""

import threading
import time

import torch

from fedsim.config import RunConfig
from fedsim.harness import Setting

# On CPU even where there is a GPU: the question is how PyTorch's CPU thread pool behaves.
setting = Setting(RunConfig(clients=10, attack="dlg", attack_iters=10, device="cpu"))
obs, _ = setting.observe(round_=1, client=0)
dlg = setting.attack()  # built once, outside the timings


def timed(where: str, threads: int) -> None:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    dlg.reconstruct(obs, setting.task)
    print(f"{where:>6} thread, torch threads {threads}: {time.perf_counter() - start:5.1f} s", flush=True)


for n in (1, 2):
    worker = threading.Thread(target=timed, args=("worker", n))
    worker.start()
    worker.join()
    timed("main", n)
