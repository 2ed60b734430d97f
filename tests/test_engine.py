"""The in-process engine drives the same ServerApp/ClientApp as Flower's Ray engine."""

import json

import pandas as pd
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedsim.config import RunConfig
from fedsim.engine import LocalGrid, run_inprocess
from fedsim.flower import client_update, make_client_app, make_server_app
from fedsim.runner import run


class Recorder:
    def __init__(self):
        self.observations = []

    def round_sent(self, server_round):
        pass

    def replies_received(self, server_round, client_seconds):
        pass

    def __call__(self, obs):
        self.observations.append(obs)


def test_fedsgd_round_in_process_applies_the_mean_client_gradient(clip_setup):
    cfg, data, task = clip_setup
    cfg.rounds = 1
    initial = {n: p.clone() for n, p in task.trainable().items()}
    finals = []
    recorder = Recorder()
    server = make_server_app(cfg, initial, {}, recorder, evaluate_fn=lambda r, arrays: finals.append(arrays))
    run_inprocess(server, make_client_app(cfg), cfg.clients)
    assert sorted(o.client for o in recorder.observations) == [0, 1, 2]
    cfg_json = json.dumps(cfg.to_dict(), sort_keys=True)
    grads = [client_update(cfg_json, c, 1, initial)[0]["prompt.ctx"] for c in range(3)]
    expected = initial["prompt.ctx"] - cfg.lr * torch.stack(grads).mean(0)
    torch.testing.assert_close(finals[-1].to_torch_state_dict()["prompt.ctx"], expected)
    for obs in recorder.observations:
        torch.testing.assert_close(obs.update["prompt.ctx"], grads[obs.client])


def test_a_failing_client_becomes_an_error_reply():
    app = ClientApp()

    @app.train()
    def train(msg, context):
        if context.node_config["partition-id"] == 1:
            raise RuntimeError("disk full")
        return Message(RecordDict({"arrays": ArrayRecord({"w": torch.ones(1)}),
                                   "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    from fedsim.engine import _task_identity
    _task_identity(0)
    grid = LocalGrid(app, 2)
    content = RecordDict({"arrays": ArrayRecord({"w": torch.zeros(1)}), "config": ConfigRecord({})})
    messages = [grid.create_message(content, "train", node, "1") for node in grid.get_node_ids()]
    replies = grid.send_and_receive(messages)
    assert [r.has_error() for r in replies] == [False, True]
    assert "disk full" in replies[1].error.reason


def test_flower_task_identity_is_where_the_engine_expects_it():
    """The one private Flower piece the engine uses; if Flower moves it, this fails first."""
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id = 7
    assert TaskIdentity.run_id == 7


@pytest.mark.slow
def test_inprocess_and_ray_engines_send_the_same_updates(tmp_path):
    """Same clients, same updates. (Attack outcomes can differ in the last digits: Ray's client
    actors compute with one CPU thread, the in-process engine with the process's pool, and
    L-BFGS amplifies float rounding.)"""
    from fedsim.observation import Observation

    outs = {}
    for engine in ("inprocess", "ray"):
        cfg = RunConfig(clients=2, attack_iters=1, engine=engine, out=str(tmp_path / engine))
        outs[engine] = run(cfg).out
        assert sorted(pd.read_csv(outs[engine] / "results.csv")["client"]) == [0, 1]
    for client in (0, 1):
        a, b = (Observation.load(outs[e] / "observations" / f"round1_client{client}.pt") for e in outs)
        assert a.meta() == b.meta()
        for name in a.update:
            torch.testing.assert_close(a.update[name], b.update[name], rtol=1e-4, atol=1e-6)
