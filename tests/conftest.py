import os

import pytest
import torch

os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
torch.set_num_threads(2)

from fedsim.config import RunConfig  # noqa: E402
from fedsim.data import federated_data  # noqa: E402
from fedsim.models import build_task, model_spec  # noqa: E402


@pytest.fixture
def cfg(tmp_path):
    return RunConfig(clients=3, out=str(tmp_path / "run"))


@pytest.fixture
def clip_setup(cfg):
    data = federated_data(cfg)
    return cfg, data, build_task(model_spec(cfg, data.private.class_names))


@pytest.fixture
def lenet_setup(tmp_path):
    cfg = RunConfig(clients=3, model="lenet", peft="full", out=str(tmp_path / "run"))
    data = federated_data(cfg)
    return cfg, data, build_task(model_spec(cfg, data.private.class_names))


@pytest.fixture(scope="module")
def one_thread():
    """One torch thread for a module of many tiny computations (Jacobian products, small forward
    passes): on a shared CPU more threads only contend (measured up to 100x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
