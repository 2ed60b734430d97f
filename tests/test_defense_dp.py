import torch

from defenses.dp import DPSGD, clip_per_example


def test_clipping_bounds_every_example_norm():
    per = {"a": torch.randn(6, 3, 4) * 5, "b": torch.randn(6, 2) * 5}
    clipped = clip_per_example(per, 1.0)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in clipped.values()))
    assert (norms <= 1.0 + 1e-5).all()
    scalar = clip_per_example({"scale": torch.tensor([3.0, -0.5]), "w": torch.zeros(2, 3)}, 1.0)
    torch.testing.assert_close(scalar["scale"], torch.tensor([1.0, -0.5]))  # a scalar parameter clips too
    small = {"a": torch.full((1, 2), 0.1)}
    torch.testing.assert_close(clip_per_example(small, 1.0)["a"], small["a"])


def test_noise_std_is_sigma_times_clip_over_batch(clip_setup):
    cfg, data, task = clip_setup
    images, labels = data.client_batch(cfg, 1, 0)
    params = task.trainable()
    clean = DPSGD(clip=0.5, noise=0.0).gradient(task, params, images, labels, torch.Generator().manual_seed(0))
    noisy = DPSGD(clip=0.5, noise=2.0).gradient(task, params, images, labels, torch.Generator().manual_seed(0))
    residual = (noisy["prompt.ctx"] - clean["prompt.ctx"]).flatten()
    assert abs(residual.std().item() - 2.0 * 0.5) < 0.15  # 256 draws: std error ~4.5%
    assert abs(residual.mean().item()) < 0.2
