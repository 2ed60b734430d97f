import math

import pytest
import torch

from fedsim import evaluate as ev


def test_hungarian_matching_undoes_a_permutation():
    true = torch.rand(5, 3, 8, 8)
    perm = torch.tensor([3, 0, 4, 1, 2])
    order = ev.match(true[perm], true)
    assert torch.equal(true[perm][order], true)
    metrics, _ = ev.evaluate(true[perm], torch.arange(5), true, torch.arange(5))
    assert metrics["mse"] == 0 and math.isinf(metrics["psnr"]) and metrics["ssim"] == pytest.approx(1.0)


def test_label_accuracy_is_multiset_overlap():
    assert ev.label_accuracy(torch.tensor([1, 1, 2]), torch.tensor([1, 2, 2])) == pytest.approx(2 / 3)
    assert ev.label_accuracy(torch.tensor([2, 1]), torch.tensor([1, 2])) == 1.0


def test_psnr_of_a_known_mse():
    assert ev.psnr(0.01) == pytest.approx(20.0)


def test_lpips_is_nan_with_a_notice_without_weights(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    metric = ev.LPIPS()
    assert not metric.available and str(tmp_path) in metric.reason
    assert math.isnan(metric(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32)))


def test_lpips_scores_when_weights_are_on_disk(tmp_path, monkeypatch):
    torchvision = pytest.importorskip("torchvision")
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    # Stand-in weights in torchvision's format (random, not ImageNet): the loading path is what is tested.
    torch.save(torchvision.models.alexnet().state_dict(), tmp_path / "hub" / "checkpoints" / ev.ALEXNET_WEIGHTS)
    metric = ev.LPIPS()
    assert metric.available
    x = torch.rand(2, 3, 32, 32)
    assert metric(x, x) == pytest.approx(0.0, abs=1e-6)
    assert metric(x, torch.rand(2, 3, 32, 32)) > 0


def test_identifiability_picks_the_true_image_out_of_a_gallery():
    from fedsim.config import RunConfig
    from fedsim.data import federated_data

    data = federated_data(RunConfig(clients=2))
    true, gallery = data.private.images[:4], data.public.images[:50]
    exact = ev.identifiability(true.clone(), true, gallery)
    assert exact == {"ident_pixel": 1.0, "ident_feature": 1.0}
    # A reconstruction that is really a different public image is identified as that one, not its own.
    wrong = ev.identifiability(gallery[:4].clone(), true, gallery)
    assert wrong["ident_pixel"] == 0.0 and wrong["ident_feature"] == 0.0
