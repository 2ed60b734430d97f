"""DLG must work where it is known to work (LeNet, batch 1), and DP must hurt it."""

import json
import statistics

import torch

from attacks.dlg import DLG
from fedsim.evaluate import evaluate
from fedsim.flower import client_update
from fedsim.models import model_spec
from fedsim.observation import Observation


def attack_clients(cfg, data, task, clients, iterations):
    cfg_json = json.dumps(cfg.to_dict(), sort_keys=True)
    spec = model_spec(cfg, data.private.class_names)
    psnrs = []
    for client in clients:
        update, n = client_update(cfg_json, client, 1, task.trainable())
        obs = Observation(1, client, "gradient", update, task.trainable(), n, cfg.lr, 1, spec)
        recon = DLG(iterations=iterations).reconstruct(obs, task)
        images, labels = data.client_batch(cfg, 1, client)
        psnrs.append(evaluate(recon.images, recon.labels, images, labels)[0]["psnr"])
    return psnrs


def test_dlg_recovers_lenet_digits_and_dp_stops_it(lenet_setup):
    cfg, data, task = lenet_setup
    clean = attack_clients(cfg, data, task, [0, 1, 2], iterations=30)
    assert statistics.median(clean) > 20, clean
    cfg.defense, cfg.dp_noise = "dp", 1.0
    noisy = attack_clients(cfg, data, task, [0, 1, 2], iterations=30)
    assert statistics.median(noisy) < statistics.median(clean) - 8, (clean, noisy)


def test_dlg_never_reads_the_private_data(clip_setup):
    """Poison every image and label the process holds after the client step: the attack's
    output must not change, so it cannot have looked at them."""
    cfg, data, task = clip_setup
    cfg_json = json.dumps(cfg.to_dict(), sort_keys=True)
    update, n = client_update(cfg_json, 0, 1, task.trainable())
    obs = Observation(1, 0, "gradient", update, task.trainable(), n, cfg.lr, 1,
                      model_spec(cfg, data.private.class_names))
    before = DLG(iterations=2).reconstruct(obs, task)
    truth = data.client_batch(cfg, 1, 0)[0].clone()
    for dataset in (data.private, data.public):
        dataset.images.zero_()
        dataset.labels.fill_(7)
    try:
        after = DLG(iterations=2).reconstruct(obs, task)
    finally:
        from fedsim.data import _load
        _load.cache_clear()  # the poisoned cache must not leak into other tests
    assert torch.equal(before.images, after.images) and torch.equal(before.labels, after.labels)
    assert not any(torch.equal(t, truth) for t in [*obs.update.values(), *obs.global_params.values()]
                   if t.shape == truth.shape)
