"""fedsim.memory: the first-order memory estimate and the check that refuses runs beyond it.
No runs here: benchmarks/memory_estimate.py compares the estimate with measured peaks."""

import math
import time

import pytest

from fedsim import memory
from fedsim.config import ConfigError, RunConfig
from fedsim.memory import GiB, available_bytes, check_memory, estimate

INPROCESS = {"engine": "inprocess", "clients": 1}


def total(**values) -> int:
    return estimate(RunConfig(**{**INPROCESS, **values})).total


def test_estimate_grows_with_image_size():
    # activations and dummy images scale with pixels: x4 per doubling once they dominate
    convnet = {"model": "convnet", "peft": "full", "attack": "ig", "batch_size": 8}
    assert 3.0 < total(**convnet, image_size=256) / total(**convnet, image_size=128) < 4.0
    # tiny-clip's tower runs at 32 px whatever the data's size: the dataset and the images grow
    assert 3.0 < total(attack="dlg", image_size=512) / total(attack="dlg", image_size=256) < 4.0
    assert total(attack="dlg", image_size=64) > total(attack="dlg", image_size=32)


def test_estimate_grows_with_batch_size():
    convnet = {"model": "convnet", "peft": "full", "attack": "ig", "image_size": 256}
    assert 2.2 < total(**convnet, batch_size=32) / total(**convnet, batch_size=8) < 4.0
    assert total(attack="dlg", image_size=256, batch_size=16) > 1.5 * total(attack="dlg", image_size=256,
                                                                             batch_size=4)


def parts(**values) -> dict:
    return estimate(RunConfig(**{**INPROCESS, **values})).parts


def test_second_order_attacks_cost_more_than_training_and_vectorised_restarts_multiply_it():
    base = {"model": "convnet", "peft": "full", "image_size": 128, "batch_size": 8}
    ig = parts(**base, attack="ig")
    assert ig["attack"] > 1.2 * ig["training"] and ig["attack_factor"] > 1
    assert parts(**base, attack="ig", attack_restarts=4)["attack"] > 3.5 * ig["attack"]  # one vmap over restarts
    dlg = parts(**base, attack="dlg")
    assert parts(**base, attack="dlg", attack_restarts=4)["attack"] == dlg["attack"]  # one after another
    # a frozen image tower under a trainable head sees a first-order backward only
    vit = {"model": "ViT-B-32", "pretrained": "none", "attack": "ig"}
    assert parts(**vit, peft="vpt")["attack_factor"] > parts(**vit, peft="adapter")["attack_factor"]
    assert parts(**vit, peft="full")["weights"] > 5 * parts(**vit, peft="coop")["weights"]


def test_clip_towers_resize_the_input_so_their_activations_hardly_depend_on_image_size():
    vit = {"model": "ViT-B-32", "pretrained": "none", "peft": "adapter"}
    small = estimate(RunConfig(**INPROCESS, **vit, image_size=32)).parts["activations_per_image"]
    large = estimate(RunConfig(**INPROCESS, **vit, image_size=64)).parts["activations_per_image"]
    assert 1.0 < large / small < 1.1
    lenet = [estimate(RunConfig(**INPROCESS, model="lenet", peft="full", image_size=s)).parts["activations_per_image"]
             for s in (32, 64)]
    assert lenet[1] / lenet[0] == pytest.approx(4, rel=0.01)


def test_a_run_far_beyond_the_machine_is_refused_with_the_numbers(monkeypatch):
    real = available_bytes("cpu")
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": min(real, 512 * GiB))
    cfg = RunConfig(**INPROCESS, image_size=1024, batch_size=64, attack="dlg")
    est = estimate(cfg)
    assert est.total > 600 * GiB
    with pytest.raises(ConfigError) as err:
        check_memory(cfg)
    message = str(err.value)
    assert f"{est.total / GiB:,.1f} GiB" in message
    assert f"{min(real, 512 * GiB) / GiB:,.1f} GiB" in message
    assert "--image-size" in message and "--batch-size" in message
    assert "dataset" in message and "scoring" in message and "activations per image" in message


def test_the_refusal_suggests_sizes_that_fit(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 16 * GiB)
    cfg = RunConfig(**INPROCESS, model="convnet", peft="full", attack="ig", image_size=512, batch_size=64)
    with pytest.raises(ConfigError) as err:
        check_memory(cfg)
    suggested = int(str(err.value).split("(--image-size ")[1].split()[0])
    assert suggested < 512
    assert estimate(RunConfig(**{**INPROCESS, "model": "convnet", "peft": "full", "attack": "ig",
                                 "image_size": suggested, "batch_size": 64})).total <= 0.9 * 16 * GiB


def test_the_default_run_passes(monkeypatch):
    est = estimate(RunConfig())
    assert est.total < 8 * GiB
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 16 * GiB)
    assert check_memory(RunConfig()).total == est.total


def test_the_default_run_passes_on_this_machine():
    if available_bytes("cpu") < 8 * GiB:
        pytest.skip("less than 8 GiB available here")
    check_memory(RunConfig())


def test_a_modest_run_is_refused_when_memory_is_short(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": GiB)
    cfg = RunConfig(**INPROCESS, model="lenet", peft="full", attack="dlg")
    with pytest.raises(ConfigError, match=r"only 1\.0 GiB is available"):
        check_memory(cfg)
    monkeypatch.setenv("FEDSIM_MEMORY_CHECK", "0")
    check_memory(cfg)  # the escape hatch


def test_on_cuda_the_gpu_holds_the_working_memory(monkeypatch):
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": 64 * GiB if device == "cpu" else GiB)
    cfg = RunConfig(**INPROCESS, model="convnet", peft="full", attack="ig", image_size=256, batch_size=16,
                    device="cuda")
    with pytest.raises(ConfigError, match="on the GPU"):
        check_memory(cfg)
    check_memory(RunConfig(**INPROCESS, model="lenet", peft="full", attack="dlg", device="cuda"))


def test_available_bytes_reads_the_host():
    free = available_bytes("cpu")
    assert 0 < free < 2 ** 50


def test_every_listed_model_gets_an_estimate_in_milliseconds():
    from fedsim.models.clip import clip_model_names

    names = ["tiny-clip", "lenet", "convnet", "resnet18", *clip_model_names()]
    start = time.perf_counter()
    for name in names:
        peft = "full" if name in ("lenet", "convnet", "resnet18") else "coop"
        est = estimate(RunConfig(model=name, peft=peft, pretrained="none", attack="ig"))
        assert math.isfinite(est.total) and est.total > memory.RUNTIME_BYTES, name
        assert est.parts["weights"] > 0 and est.parts["activations_per_image"] > 0, name
    assert (time.perf_counter() - start) / len(names) < 0.01


def test_the_estimate_builds_no_model_and_loads_no_data(monkeypatch):
    import fedsim.data
    import fedsim.models

    def refuse(*args, **kwargs):
        raise AssertionError("estimate() must not build models or load data")

    for module, name in ((fedsim.data, "load_dataset"), (fedsim.data, "federated_data"),
                         (fedsim.models, "build_model"), (fedsim.models, "build_task")):
        monkeypatch.setattr(module, name, refuse)
    for model in ("tiny-clip", "ViT-B-32", "lenet"):
        estimate(RunConfig(model=model, peft="full" if model == "lenet" else "coop", pretrained="none"))


def test_describe_names_the_parts():
    line = estimate(RunConfig(**INPROCESS, model="convnet", peft="full", attack="ig", image_size=128,
                              batch_size=8)).describe()
    assert line.startswith("about ") and "GiB" in line
    for word in ("weights", "per image x 8 images x 2 for the second-order gradients", "scoring", "dataset",
                 "1,797 images at 128 px"):
        assert word in line
