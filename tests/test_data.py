import numpy as np
import torch

from fedsim.config import RunConfig
from fedsim.data import federated_data


def test_digits_are_rgb_32px_in_unit_range():
    data = federated_data(RunConfig(clients=10))
    imgs = data.private.images
    assert imgs.shape[1:] == (3, 32, 32)
    assert imgs.min() >= 0 and imgs.max() <= 1 and imgs.max() > 0.9
    assert data.private.num_classes == 10
    assert len(data.private) + len(data.public) == 1797


def test_iid_partition_is_disjoint_complete_and_seeded():
    data = federated_data(RunConfig(clients=7, seed=3))
    joined = np.concatenate(data.client_indices)
    assert len(joined) == len(set(joined.tolist())) == len(data.private)
    again = federated_data(RunConfig(clients=7, seed=3))
    assert all((a == b).all() for a, b in zip(data.client_indices, again.client_indices))
    other = federated_data(RunConfig(clients=7, seed=4))
    assert not all((a == b).all() for a, b in zip(data.client_indices, other.client_indices))


def test_batch_schedule_is_deterministic_and_within_the_client():
    cfg = RunConfig(clients=5, batch_size=4)
    data = federated_data(cfg)
    idx = data.client_batch_indices(cfg, 2, 3)
    assert set(idx.tolist()) <= set(data.client_indices[3].tolist())
    assert (idx == data.client_batch_indices(cfg, 2, 3)).all()
    assert not (idx == data.client_batch_indices(cfg, 3, 3)).all()
    images, labels = data.client_batch(cfg, 2, 3)
    assert images.shape == (4, 3, 32, 32) and torch.equal(labels, data.private.labels[torch.as_tensor(idx)])
