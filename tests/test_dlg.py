"""DLG must work where it is known to work (LeNet, batch 1), and DP must hurt it."""

import statistics

from attacks.dlg import DLG
from fedsim.config import RunConfig
from fedsim.harness import Setting


def attack_clients(setting, clients, iterations):
    scorer = setting.scorer()
    psnrs = []
    for client in clients:
        obs, truth = setting.observe(1, client)
        recon = DLG(iterations=iterations).reconstruct(obs, setting.task)
        psnrs.append(scorer.score(obs, recon, truth)[0]["psnr"])
    return psnrs


def test_dlg_recovers_lenet_digits_and_dp_stops_it():
    lenet = dict(clients=3, model="lenet", peft="full", attack="dlg")
    clean = attack_clients(Setting(RunConfig(**lenet)), [0, 1, 2], iterations=30)
    assert statistics.median(clean) > 20, clean
    noisy = attack_clients(Setting(RunConfig(**lenet, defense="dp", dp_noise=1.0)), [0, 1, 2], iterations=30)
    assert statistics.median(noisy) < statistics.median(clean) - 8, (clean, noisy)
