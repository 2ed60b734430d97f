"""Defenses in Flower's protocol, through a whole in-process run: what the curious server observes."""

import pandas as pd
import pytest
import torch
from rich.console import Console

from fedsim.config import RunConfig
from fedsim.observation import Observation
from fedsim.runner import run


def observed(out, round_=1):
    return {int(p.stem.split("client")[1]): Observation.load(p)
            for p in sorted((out / "observations").glob(f"round{round_}_client*.pt"))}


def lenet_run(tmp_path, name, **kw):
    cfg = RunConfig(clients=3, rounds=2, batch_size=2, model="lenet", peft="full", attack="none",
                    engine="inprocess", out=str(tmp_path / name), **kw)
    return run(cfg, console=Console(quiet=True)).out


@pytest.mark.parametrize("protocol", ["fedsgd", "fedavg"])
def test_flower_dp_clips_every_update_the_server_sees_and_reports_epsilon(tmp_path, protocol):
    clip, lr = 0.05, 0.1
    out = lenet_run(tmp_path, protocol, defense="flower-dp", update_clip=clip, update_noise=0.0, lr=lr,
                    protocol=protocol)
    plain = lenet_run(tmp_path, protocol + "-plain", lr=lr, protocol=protocol)
    for client, obs in observed(out).items():
        step = obs.update if protocol == "fedavg" else {n: lr * g for n, g in obs.update.items()}
        norm = torch.sqrt(sum(s.pow(2).sum() for s in step.values()))
        assert norm <= clip * (1 + 1e-4)  # Flower's fixedclipping_mod bounded it
        raw = observed(plain)[client].update  # the same update, undefended, points the same way
        cos = sum((obs.update[n] * raw[n]).sum() for n in raw) / (
            torch.sqrt(sum(u.pow(2).sum() for u in obs.update.values()))
            * torch.sqrt(sum(u.pow(2).sum() for u in raw.values())))
        assert cos > 0.999
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["round"]) == [0, 1, 2] and metrics["epsilon_client"].iloc[-1] == float("inf")


@pytest.mark.parametrize("protocol", ["fedsgd", "fedavg"])
def test_secagg_runs_flower_secaggplus_and_the_attack_gets_only_the_aggregate(tmp_path, monkeypatch, protocol):
    """A real SecAgg+ round (Flower's SecAggPlusWorkflow + secaggplus_mod, 3 clients): every reply
    the server receives carries no update in the clear, and the one observation per round is
    the clients' mean update up to SecAgg+'s stochastic quantisation (2 * clip / 2^22 per entry)."""
    from fedsim.engine import LocalGrid

    replies = []
    pull = LocalGrid.pull_messages

    def recording(self, message_ids):
        out = list(pull(self, message_ids))
        replies.extend(out)
        return out

    monkeypatch.setattr(LocalGrid, "pull_messages", recording)
    secure = observed(lenet_run(tmp_path, "secagg", defense="secagg", protocol=protocol))
    assert replies and not any(m.has_error() for m in replies)
    assert all(len(a) == 0 for m in replies for a in m.content.array_records.values())  # masked: no arrays
    monkeypatch.setattr(LocalGrid, "pull_messages", pull)
    each = observed(lenet_run(tmp_path, "plain", protocol=protocol))
    assert list(secure) == [-1] and sorted(secure[-1].clients) == [0, 1, 2] and secure[-1].batch_size == 6
    assert secure[-1].kind == each[0].kind
    mean = {n: sum(o.update[n] for o in each.values()) / 3 for n in each[0].update}
    step = 2 * RunConfig().option("secagg_clip") / 2**22
    for n in mean:
        torch.testing.assert_close(secure[-1].update[n], mean[n], rtol=0, atol=step)
    spread = max(float((each[0].update[n] - mean[n]).abs().max()) for n in mean)
    assert spread > 1000 * step  # the aggregate is not any one client's update


def test_secagg_parameters_are_checked_before_the_run():
    from fedsim.config import ConfigError

    for kw, match in [({"secagg_shares": 2}, "secagg-shares"), ({"secagg_threshold": 3}, "secagg-threshold"),
                      ({"secagg_clip": 0.0}, "secagg-clip"), ({"clients": 1}, "at least 2 clients"),
                      ({"defense": "secagg,flower-dp"}, "flower-dp")]:
        cfg = RunConfig(**{"defense": "secagg", "clients": 3, **kw})
        with pytest.raises(ConfigError, match=match):
            cfg.validate()


def test_overwriting_a_run_starts_its_metrics_afresh(tmp_path):
    lenet_run(tmp_path, "again", defense="dp")
    out = lenet_run(tmp_path, "again", defense="prune", overwrite=True)
    metrics = pd.read_csv(out / "metrics.csv")
    assert list(metrics["round"]) == [0, 1, 2] and "epsilon" not in metrics
