"""I2F (fedsim.audit): linear in the perturbation, bounded below, zero without noise, CG equal to a
dense solve, and one finite row per client from `audit`."""

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedsim.audit import GradientMap, audit, expected_perturbation, i2f
from fedsim.config import RunConfig
from fedsim.harness import Setting
from fedsim.task import Task

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny products: more threads only contend


@pytest.fixture(scope="module")
def lenet():
    setting = Setting(RunConfig(clients=2, model="lenet", peft="full", attack="none"), device="cpu")
    obs, truth = setting.observe(1, 0)
    return setting, obs.global_params, truth


def draw(params, std, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {n: std * torch.randn(p.shape, generator=gen) for n, p in params.items()}


def test_i2f_is_linear_in_the_noise_and_above_its_lower_bound(lenet):
    setting, params, truth = lenet
    delta = draw(params, 1e-3)
    one = i2f(setting.task, params, truth.images, truth.labels, delta)
    two = i2f(setting.task, params, truth.images, truth.labels, {n: 2 * d for n, d in delta.items()})
    assert one["i2f"] > 0 and one["reliable"]
    assert two["i2f"] == pytest.approx(2 * one["i2f"], rel=1e-4)
    assert two["i2f_lb"] == pytest.approx(2 * one["i2f_lb"], rel=1e-4)
    assert one["i2f_lb"] <= one["i2f"]
    assert one["rmse_pred"] == pytest.approx(one["i2f"] / math.sqrt(truth.images.numel()))
    assert one["psnr_pred"] == pytest.approx(-20 * math.log10(one["rmse_pred"]))


def test_zero_noise_gives_zero(lenet):
    setting, params, truth = lenet
    out = i2f(setting.task, params, truth.images, truth.labels, draw(params, 0.0))
    assert out["i2f"] == 0 and out["i2f_lb"] == 0 and out["psnr_pred"] == math.inf


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(12, 3), nn.Sigmoid(), nn.Linear(3, 2))

    def forward(self, x):
        return self.net(x)


def test_cg_agrees_with_a_dense_solve():
    task = Task(Tiny().double(), 2, (3, 2, 2))
    params = task.trainable()
    x = torch.rand(1, 3, 2, 2, dtype=torch.float64)
    y = torch.tensor([1])
    names = list(params)

    def flat_gradient(inputs):
        grads = torch.autograd.grad(task.loss(params_leaves, inputs, y), list(params_leaves.values()),
                                    create_graph=True)
        return torch.cat([g.reshape(-1) for g in grads])

    params_leaves = {n: p.clone().requires_grad_(True) for n, p in params.items()}
    jac = torch.autograd.functional.jacobian(flat_gradient, x)  # [d_theta, 1, 3, 2, 2]
    J = jac.reshape(jac.shape[0], -1).T.numpy()  # d_x x d_theta: input rows
    delta = draw(params, 1e-2, seed=1)
    flat = torch.cat([delta[n].reshape(-1) for n in names]).double().numpy()
    dense = np.linalg.norm(np.linalg.solve(J @ J.T, J @ flat))
    lam = np.linalg.eigvalsh(J @ J.T)[-1]
    out = i2f(task, params, x, y, delta, rel_damping=0.0, cg_tol=1e-12, cg_maxiter=200)
    assert out["i2f"] == pytest.approx(dense, rel=1e-5)
    assert out["lambda_max"] == pytest.approx(lam, rel=1e-3)
    assert out["jdelta_norm"] == pytest.approx(np.linalg.norm(J @ flat), rel=1e-8)
    gmap = GradientMap(task, params, x, y)
    v = torch.randn(12, dtype=torch.float64)
    assert np.allclose(gmap.JT(v).numpy(), J.T @ v.numpy(), rtol=1e-7, atol=1e-10)


def test_expected_perturbation_of_dp_and_prune(lenet):
    _, params, truth = lenet
    dp = Setting(RunConfig(clients=2, model="lenet", peft="full", attack="none", defense="dp",
                           dp_noise=0.5, dp_clip=2.0), device="cpu")
    delta, notes = expected_perturbation(dp, truth.images, truth.labels, params)
    entries = torch.cat([d.reshape(-1) for d in delta.values()])
    assert float(entries.std()) == pytest.approx(0.5 * 2.0 / 1, rel=0.05) and "dp" in notes[0]
    prune = Setting(RunConfig(clients=2, model="lenet", peft="full", attack="none", defense="prune",
                              prune_ratio=0.5), device="cpu")
    clean = prune.task.gradients(params, truth.images, truth.labels)
    delta, _ = expected_perturbation(prune, truth.images, truth.labels, params)
    for n, d in delta.items():  # minus the pruned entries: zero where kept, -g where pruned
        pruned = d != 0
        assert torch.equal(d[pruned], -clean[n][pruned])
        assert 0.3 < float(pruned.float().mean()) <= 0.5


def test_audit_gives_one_finite_row_per_client():
    setting = Setting(RunConfig(clients=3, model="lenet", peft="full", attack="none"), device="cpu")
    frame = audit(setting, noise=1e-3)
    assert list(frame["client"]) == [0, 1, 2] and set(frame["round"]) == {1}
    for col in ("i2f", "i2f_lb", "rmse_pred", "psnr_pred", "seconds"):
        assert np.isfinite(frame[col]).all(), col
    assert (frame["i2f_lb"] <= frame["i2f"]).all() and frame["reliable"].all()
    assert {"label", "space", "perturbation"} <= set(frame.columns)


def test_audit_of_clip_peft_is_with_respect_to_the_embedding():
    setting = Setting(RunConfig(clients=2, peft="coop", attack="none"), device="cpu")
    frame = audit(setting, noise=1e-3)
    assert list(frame["space"]) == ["embedding", "embedding"]
    assert np.isfinite(frame["i2f"]).all() and (frame["i2f"] > 0).all()
    assert (frame["i2f_lb"] <= frame["i2f"]).all()


def test_fedsim_audit_writes_audit_csv_and_refuses_bad_input(tmp_path):
    import pandas as pd
    from typer.testing import CliRunner

    from fedsim.cli import app

    out = tmp_path / "audit"
    result = CliRunner().invoke(app, ["audit", "--model", "lenet", "--peft", "full", "--clients", "2", "--attack",
                                      "none", "--defense", "prune", "--audit-noise", "1e-3", "--out", str(out)],
                                env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    frame = pd.read_csv(out / "audit.csv")
    assert sorted(frame["client"]) == [0, 1] and {"i2f", "i2f_lb", "rmse_pred", "psnr_pred"} <= set(frame)
    assert (frame["i2f_lb"] <= frame["i2f"]).all() and "prune: the defense's own transform" in result.output
    bad = CliRunner().invoke(app, ["audit", "--model", "lenet", "--peft", "full", "--dp-noise", "nan",
                                   "--defense", "dp"], env={"COLUMNS": "200"})
    assert bad.exit_code == 2 and "--dp-noise must be a finite number" in bad.output


def test_audit_of_later_rounds_follows_the_runs_global_model(tmp_path):
    """Round 2 is audited at the weights the run's server reaches: the same as the global
    parameters a real (in-process) run saved with its round-2 observations."""
    from fedsim.runner import run

    cfg = RunConfig(clients=2, rounds=2, model="lenet", peft="full", attack="dlg", attack_iters=1,
                    engine="inprocess", out=str(tmp_path / "run"))
    run(cfg)
    saved = torch.load(tmp_path / "run" / "observations" / "round2_client1.pt", weights_only=True)
    replayed = Setting(cfg, device="cpu").global_weights(2)
    initial = Setting(cfg, device="cpu").global_weights(1)
    for name, value in saved["global_params"].items():
        assert torch.allclose(replayed[name], value, atol=1e-6), name
        assert not torch.allclose(initial[name], value, atol=1e-6), name  # the check can fail
    frame = audit(Setting(cfg, device="cpu"), noise=1e-3)
    assert sorted(zip(frame["round"], frame["client"])) == [(1, 0), (1, 1), (2, 0), (2, 1)]


def test_later_rounds_need_every_client():
    setting = Setting(RunConfig(clients=4, rounds=2, fraction=0.5, model="lenet", peft="full", attack="none"),
                      device="cpu")
    with pytest.raises(Exception, match="--fraction 0.5"):
        audit(setting, noise=1e-3)


def test_audit_into_a_finished_run_adds_to_its_page(tmp_path):
    """`fedsim audit --out RUN` keeps the run's files, adds audit.csv and the audit section to its
    report page, with the rank correlation against the run's own measured errors."""
    from typer.testing import CliRunner

    from fedsim.cli import app

    out = tmp_path / "run"
    common = ["--model", "lenet", "--peft", "full", "--clients", "3", "--out", str(out)]
    ran = CliRunner().invoke(app, ["run", *common, "--attack", "dlg", "--attack-iters", "2", "--engine",
                                   "inprocess"], env={"COLUMNS": "200"})
    assert ran.exit_code == 0, ran.output
    config = (out / "config.yaml").read_text()
    audited = CliRunner().invoke(app, ["audit", *common, "--audit-noise", "1e-3"], env={"COLUMNS": "200"})
    assert audited.exit_code == 0, audited.output
    assert (out / "config.yaml").read_text() == config and (out / "audit_config.yaml").exists()
    page = (out / "report.html").read_text()
    assert 'id="audit"' in page and 'id="audit-rho"' in page and "Reconstructions" in page
    assert "audit noise: Gaussian std 0.001" in page


def test_an_audit_alone_gets_its_own_page(tmp_path):
    from fedsim.pages import write_page

    out = tmp_path / "audit"
    out.mkdir()
    setting = Setting(RunConfig(clients=2, model="lenet", peft="full", attack="none"), device="cpu")
    audit(setting, noise=1e-3).to_csv(out / "audit.csv", index=False)
    page = write_page(out).read_text()
    assert "fedsim audit: predicted leakage" in page and 'id="audit"' in page and "What leaked" not in page
    (out / "audit.csv").write_text("not,an\naudit,file\n")  # a foreign file: the page shows the rest
    assert 'id="audit"' not in write_page(out).read_text()
