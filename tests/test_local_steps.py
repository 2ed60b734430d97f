"""MIP on FedAvg deltas of several local steps: the text side's steps replayed (attacks.local_steps)."""

import pytest
import torch
import torch.nn.functional as F

from attacks.embeddings import text_side
from attacks.local_steps import ITERATIONS, STARTS, LocalSteps, replays
from fedsim.api import observed
from fedsim.config import RunConfig
from fedsim.harness import Setting
from fedsim.task import precision, second_order_attention


def coop_setting(batch: int, steps: int) -> Setting:
    return Setting(RunConfig(peft="coop", protocol="fedavg", local_steps=steps, batch_size=batch, clients=3),
                   device="cpu")


def test_replay_gives_the_clients_delta_from_the_true_embeddings():
    setting = coop_setting(batch=2, steps=3)
    obs, truth = setting.observe(1, 0)
    task, params = setting.task, obs.global_params
    with torch.no_grad():
        Z = task.embeddings(params, truth.images).double()
    client = LocalSteps(task, params, list(obs.update), obs.lr, obs.local_steps)
    with precision(task.model, torch.float64), second_order_attention():
        replayed = client.delta(Z, truth.labels)
        one_step = LocalSteps(task, params, list(obs.update), obs.lr, 1).delta(Z, truth.labels)
    sent = torch.cat([obs.update[n].reshape(-1) for n in obs.update]).double()
    assert float((replayed - sent).norm() / sent.norm()) < 1e-5
    assert float((obs.local_steps * one_step - sent).norm() / sent.norm()) > 1e-2  # the steps do move it
    assert next(task.model.parameters()).dtype == torch.float32  # the model is handed back as it was


def test_mip_replays_local_steps_where_the_pseudo_gradient_misses_the_embedding():
    setting = coop_setting(batch=1, steps=2)
    obs, truth = setting.observe(1, 1)
    task = setting.task
    with torch.no_grad():
        true_z = task.embeddings(obs.global_params, truth.images)
    ticks = []
    mip = setting.attack(progress=lambda done, total: ticks.append((done, total)))
    labels, z, info = mip.recover_embeddings(obs, task)
    replay = [(done, total) for done, total in ticks if total == STARTS * ITERATIONS]  # the replay's own ticks
    assert replay and all(done <= total for done, total in replay)  # where a stop or --attack-timeout acts
    assert labels.tolist() == truth.labels.tolist()
    assert info["replayed_steps"] == 2 and info["replay_residual"] < 1e-4
    assert F.cosine_similarity(z.cpu(), true_z).item() > 0.999
    # the pseudo-gradient alone, as before the replay: the same labels, a worse embedding
    update, params = observed(obs, task)
    state = mip.round_state(task, params, list(update))
    _, pseudo, _ = text_side(task, params, update, 1, state["public"], jacobian=state["jacobian"])
    assert F.cosine_similarity(pseudo, true_z).item() < F.cosine_similarity(z.cpu(), true_z).item() - 0.01


@pytest.mark.parametrize("kind,steps,batch,expected", [
    ("gradient", 1, 1, False),
    ("delta", 1, 1, False),  # one step: the pseudo-gradient is exact
    ("delta", 5, 1, True),
    ("delta", 5, 4, False),  # beyond batch 1: not worth it yet
])
def test_local_steps_of_one_example_are_replayed(kind, steps, batch, expected):
    assert replays(kind, steps, batch) is expected
