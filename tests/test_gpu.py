"""The device paths on CUDA, each against what the CPU computes: DP-SGD's per-example gradients,
every installed attack, MIP's text Jacobian and label search, a Ray run whose clients and server
sit on the GPU, and a sweep whose trials share one. Skipped without CUDA; on a GPU machine
`benchmarks/gpu_check.sh` runs them (with the timings) and writes what it found to a folder.

    .venv/bin/python -m pytest -m gpu -rs tests/test_gpu.py
"""

import io
import warnings

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console

from fedsim.config import RunConfig
from fedsim.harness import Setting
from fedsim.observation import Observation
from fedsim.plugins import attack_names

NO_CUDA = "needs CUDA: run benchmarks/gpu_check.sh on a GPU machine"
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)]

# tests/test_contract.py's setting: a linear-probe CLIP client, to which every attack and label rule
# applies, on the cached pre-trained tiny CLIP; two iterations keep every attack quick.
SETTING = dict(clients=3, peft="linear-probe", seed=4321, partition="dirichlet", attack_iters=2, attack_seed=5)


@pytest.fixture
def full_float32():
    """CUDA may round float32 matrix products and convolutions to TF32 (10 mantissa bits); a
    comparison with the CPU's float32 wants them exact."""
    with warnings.catch_warnings():  # torch >= 2.9 prefers its fp32_precision API; these still work
        warnings.simplefilter("ignore")
        before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def assert_close(got: dict, want: dict, rel: float) -> None:
    """Each tensor within `rel` of the other in relative L2 norm (float rounding, not bit equality:
    the GPU sums in another order)."""
    assert got.keys() == want.keys()
    for name in want:
        a, b = got[name].detach().cpu().double(), want[name].detach().cpu().double()
        assert a.shape == b.shape, name
        error = float((a - b).norm() / b.norm().clamp_min(1e-30))
        assert error < rel, f"{name}: relative error {error:.2e} (tolerance {rel:g})"


def quiet() -> Console:
    return Console(file=io.StringIO())


def errors(table, column: str = "error") -> list:
    """A results table's error messages, for an assertion's message."""
    return table[column].dropna().tolist() if column in table else []


# ---------------------------------------------------------------- the client's side: DP-SGD's vmap


@pytest.mark.parametrize("peft", ["coop", "adapter"])
def test_dp_sgd_per_example_gradients_on_cuda_equal_the_cpu_ones(peft, full_float32):
    # noise 0 makes DP-SGD deterministic; clip 0.05 clips some examples, so the clipping runs too
    cfg = RunConfig(clients=3, batch_size=4, peft=peft, defense="dp", dp_noise=0.0, dp_clip=0.05)
    gpu, cpu = Setting(cfg, device="cuda"), Setting(cfg, device="cpu")
    assert gpu.task.device.type == "cuda"
    observed, truth = gpu.observe(1, 0)  # the client's update through the defense on the GPU
    expected, same = cpu.observe(1, 0)
    assert torch.equal(truth.images, same.images) and torch.equal(truth.labels, same.labels)
    assert_close(observed.update, expected.update, rel=1e-4)

    params = {n: p.detach().to("cuda") for n, p in expected.global_params.items()}
    per_gpu = gpu.task.per_example_gradients(params, truth.images.cuda(), truth.labels.cuda())
    per_cpu = cpu.task.per_example_gradients(expected.global_params, truth.images, truth.labels)
    assert all(g.device.type == "cuda" and g.shape[0] == 4 for g in per_gpu.values())
    assert_close(per_gpu, per_cpu, rel=1e-4)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in per_cpu.values()))
    assert (norms > 0.05).any(), "no example was clipped: lower dp_clip so the test covers clipping"


# ---------------------------------------------------------------- the server's side: every attack


@pytest.mark.parametrize("attack", attack_names())
def test_every_attack_reconstructs_on_cuda(attack):
    setting = Setting(RunConfig(attack=attack, **SETTING), device="cuda")
    assert setting.task.device.type == "cuda"
    obs, truth = setting.observe(1, 0)
    recon = setting.attack().reconstruct(obs, setting.task)
    images, labels = recon.images, recon.labels
    assert images.shape == truth.images.shape and images.dtype == torch.float32
    assert torch.isfinite(images).all()
    assert float(images.min()) >= 0.0 and float(images.max()) <= 1.0
    assert labels.shape == truth.labels.shape and not labels.is_floating_point()
    assert ((labels >= -1) & (labels < setting.task.num_classes)).all()
    row = setting.scorer().row(obs, recon, truth)  # the scorer runs on the GPU task too
    assert row["status"] == "ok" and 0 < row["psnr"] < 100


# ---------------------------------------------------------------- MIP's text side on CUDA


def coop_setting(device: str, batch: int) -> Setting:
    return Setting(RunConfig(peft="coop", batch_size=batch, clients=3), device=device)


def test_text_jacobian_on_cuda_equals_the_cpu_one():
    from attacks.embeddings import TextJacobian

    gpu, cpu = coop_setting("cuda", 1), coop_setting("cpu", 1)
    params = cpu.task.trainable()
    on_gpu = TextJacobian(gpu.task, {n: p.detach().cuda() for n, p in params.items()}, list(params))
    on_cpu = TextJacobian(cpu.task, params, list(params))
    assert on_gpu.matrix.device.type == "cuda" and on_gpu.matrix.dtype == torch.float64
    assert next(gpu.task.model.parameters()).dtype == torch.float32  # the float64 detour is undone
    assert_close({"J": on_gpu.matrix, "T": on_gpu.text}, {"J": on_cpu.matrix, "T": on_cpu.text}, rel=1e-6)


@pytest.mark.parametrize("classes", [(3,), (2, 6)], ids=["batch1", "batch2"])
def test_mip_label_search_on_cuda_finds_the_labels_and_embeddings(classes):
    """As tests/test_mip.py checks on the CPU: the true labels, and embeddings within 0.99 cosine."""
    setting = coop_setting("cuda", len(classes))
    private = setting.data.private
    idx = [int((private.labels == c).nonzero()[k]) for k, c in enumerate(classes)]  # distinct images
    images, labels = private.images[idx], private.labels[idx]
    obs = setting.observe_examples(images, labels)
    mip = setting.attack()
    found, features, info = mip.recover_embeddings(obs, setting.task)
    params = {n: p.cuda() for n, p in obs.global_params.items()}
    state = mip.round_state(setting.task, params, list(obs.update))  # the round's, cached: not computed again
    assert state["jacobian"].matrix.device.type == "cuda"
    assert info["route"] == "text"
    assert sorted(found.tolist()) == sorted(labels.tolist())
    assert info["relative_residual"] < 1e-3
    with torch.no_grad():
        z = F.normalize(setting.task.embeddings(params, features=features), dim=-1)
        true = F.normalize(setting.task.embeddings(params, images.cuda()), dim=-1)
    assert (z @ true.T).max(1).values.min() > 0.99


# ---------------------------------------------------------------- a whole run, and a sweep


def test_a_four_client_ray_run_on_cuda_matches_the_cpu_in_process_run(tmp_path):
    pytest.importorskip("ray")  # an offline GPU machine may lack it (benchmarks/gpu_check.sh, set-up)
    from fedsim.runner import run

    common = dict(clients=4, attack="mip", attack_iters=5)
    gpu = run(RunConfig(**common, engine="ray", device="cuda", out=str(tmp_path / "gpu")), console=quiet())
    cpu = run(RunConfig(**common, engine="inprocess", device="cpu", out=str(tmp_path / "cpu")), console=quiet())
    g, c = (r.results.sort_values("client").reset_index(drop=True) for r in (gpu, cpu))
    assert g["client"].tolist() == c["client"].tolist() == [0, 1, 2, 3]
    assert (g["status"] == "ok").all(), errors(g)
    assert (c["status"] == "ok").all(), errors(c)
    assert g["label_acc"].tolist() == c["label_acc"].tolist()
    for client in range(4):  # what the clients on their quarter GPUs sent, against the CPU's
        tag = f"observations/round1_client{client}.pt"
        assert_close(Observation.load(gpu.out / tag).update, Observation.load(cpu.out / tag).update, rel=1e-2)


def test_a_sweep_with_half_a_gpu_per_trial_runs_every_trial_on_cuda(tmp_path):
    ray = pytest.importorskip("ray")
    import yaml

    from fedsim.grid import parse_grid
    from fedsim.sweep import sweep

    if ray.is_initialized():  # a Ray left by an earlier test would not hold the sweep's settings
        ray.shutdown()
    grid = parse_grid({"base": {"clients": 2, "pretrained": "none", "attack": "dlg", "attack_iters": 1},
                       "grid": {"seed": [0, 1]}})
    summary = sweep(grid, tmp_path / "s", gpus_per_trial=0.5, console=quiet())
    table = summary.table
    assert len(summary.ran) == 2 and not summary.failed, errors(table, "trial_error")
    assert (table["trial_status"] == "ok").all() and (table["status"] == "ok").all()
    assert table.groupby("trial_id").size().tolist() == [2, 2]  # one row per attacked client
    for trial in grid.trials:  # Ray gave each trial its half of the GPU, and the trial used it
        config = yaml.safe_load((tmp_path / "s" / "trials" / trial.id / "config.yaml").read_text())
        assert config["device"] == "cuda"
