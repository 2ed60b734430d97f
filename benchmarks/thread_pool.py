"""Attack speed on CPU in a worker thread vs the main thread, with 1 and 2 torch threads.

Flower calls the strategy, and so the attacks, from a worker thread. This compares DLG on the
default tiny-CLIP/CoOp setting in both places (ratios within one run; machines are noisy):

    .venv/bin/python benchmarks/thread_pool.py
"""

import threading
import time

import torch

from attacks.dlg import DLG
from fedsim.config import RunConfig
from fedsim.data import federated_data
from fedsim.models import build_task, model_spec
from fedsim.observation import Observation

cfg = RunConfig(clients=10)
data = federated_data(cfg)
spec = model_spec(cfg, data.private.class_names)
task = build_task(spec)
x, y = data.client_batch(cfg, 1, 0)
obs = Observation(1, 0, "gradient", task.gradients(task.trainable(), x, y), task.trainable(), 1, 0.1, 1, spec)


def timed(where: str, threads: int) -> None:
    torch.set_num_threads(threads)
    start = time.perf_counter()
    DLG(iterations=10).reconstruct(obs, task)
    print(f"{where:>6} thread, torch threads {threads}: {time.perf_counter() - start:5.1f} s", flush=True)


for n in (1, 2):
    worker = threading.Thread(target=timed, args=("worker", n))
    worker.start()
    worker.join()
    timed("main", n)
