"""Datasets, partitions and `fedsim data describe`. On-disk formats are faked in tmp_path."""

import os
import pickle
import struct

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.config import ConfigError, RunConfig
from fedsim.data import federated_data, load_dataset, partition_dirichlet, partition_iid, partition_shard
from fedsim.datasets import SOURCES
from fedsim.datasets.embedded import load_photos
from fedsim.datasets.files import read_cifar_pickle
from fedsim.datasets.synthetic import load_synthetic

EMBEDDED = {"digits": (1797, 10), "faces": (200, 2), "photos": (600, 10), "synthetic": (1000, 10)}


def _is_word(name: str) -> bool:
    return name.replace(" ", "").isalpha()


def test_the_dataset_option_takes_exactly_the_loaders():
    for name in SOURCES:
        RunConfig(dataset=name, data_root="/tmp").validate_data()
    with pytest.raises(ConfigError, match="valid: " + ", ".join(SOURCES)):
        RunConfig(dataset="svhn").validate_data()


@pytest.mark.parametrize("name", EMBEDDED)
def test_embedded_datasets_are_rgb_unit_range_with_word_class_names(name):
    data = load_dataset(RunConfig(dataset=name))
    size, classes = EMBEDDED[name]
    assert data.images.shape == (size, 3, 32, 32) and data.images.dtype == torch.float32
    assert data.images.min() >= 0 and data.images.max() <= 1 and data.images.max() > 0.9
    assert data.labels.dtype == torch.int64
    assert data.num_classes == classes and sorted(data.labels.unique().tolist()) == list(range(classes))
    assert all(_is_word(n) for n in data.class_names) and len(set(data.class_names)) == classes


@pytest.mark.parametrize("name", ["faces", "photos", "synthetic"])
def test_image_size_resizes(name):
    assert load_dataset(RunConfig(dataset=name, image_size=20)).images.shape[1:] == (3, 20, 20)


def test_faces_are_the_first_hundred_then_background():
    data = load_dataset(RunConfig(dataset="faces"))
    assert data.class_names == ("face", "background")
    assert data.labels.tolist() == [0] * 100 + [1] * 100


def test_generated_datasets_are_seeded():
    a, b, c = (load_synthetic(16, seed, 5, 4) for seed in (1, 1, 2))
    assert torch.equal(a.images, b.images) and not torch.equal(a.images, c.images)
    p, q = load_photos(16, 3), load_photos(16, 3)
    assert torch.equal(p.images, q.images)
    assert not torch.equal(p.images, load_photos(16, 4).images)


def test_synthetic_beyond_eight_shapes_names_colour_and_shape():
    data = load_synthetic(16, 0, 20, 2)
    assert len(set(data.class_names)) == 20 and data.class_names[0] == "red circle"
    assert all(len(n.split()) == 2 for n in data.class_names)
    assert load_synthetic(16, 0, 3, 2).class_names == ("circle", "square", "triangle")
    with pytest.raises(ConfigError, match="--synthetic-classes 65 is too many; valid: 1..64"):
        RunConfig(dataset="synthetic", synthetic_classes=65).validate_data()


# --- partitions ---------------------------------------------------------------------------

LABELS = np.repeat(np.arange(10), 100)
PARTITIONS = {
    "iid": lambda seed: partition_iid(len(LABELS), 7, seed),
    "dirichlet": lambda seed: partition_dirichlet(LABELS, 7, 0.3, seed, min_size=5),
    "shard": lambda seed: partition_shard(LABELS, 7, 2, seed),
}


@pytest.mark.parametrize("kind", PARTITIONS)
def test_partitions_are_disjoint_complete_and_seeded(kind):
    parts = PARTITIONS[kind](3)
    joined = np.concatenate(parts)
    assert len(parts) == 7 and sorted(joined.tolist()) == list(range(len(LABELS)))
    assert all((a == b).all() for a, b in zip(parts, PARTITIONS[kind](3)))
    assert not all(len(a) == len(b) and (a == b).all() for a, b in zip(parts, PARTITIONS[kind](4)))


def _skew(parts) -> float:
    """Mean total-variation distance between each client's label mix and the global one."""
    overall = np.bincount(LABELS) / len(LABELS)
    return float(np.mean([0.5 * abs(np.bincount(LABELS[p], minlength=10) / len(p) - overall).sum()
                          for p in parts]))


def test_dirichlet_skew_grows_as_alpha_shrinks():
    skews = [_skew(partition_dirichlet(LABELS, 10, alpha, 0, min_size=1)) for alpha in (100, 1, 0.1)]
    assert skews[0] < 0.1 < skews[1] < skews[2]


def test_dirichlet_gives_every_client_a_batch_or_says_why():
    parts = partition_dirichlet(LABELS, 10, 0.1, 0, min_size=20)
    assert min(len(p) for p in parts) >= 20
    with pytest.raises(ConfigError, match=r"--alpha 0.001 left a client with fewer than --batch-size 50"):
        partition_dirichlet(LABELS, 10, 0.001, 0, min_size=50)
    with pytest.raises(ConfigError, match="needs 1100 private images"):
        partition_dirichlet(LABELS, 11, 1.0, 0, min_size=100)


def test_shard_gives_each_client_exactly_its_classes_and_spreads_classes_evenly():
    parts = partition_shard(LABELS, 7, 3, 0)
    classes = [set(LABELS[p].tolist()) for p in parts]
    assert all(len(c) == 3 for c in classes)
    holders = np.bincount([k for c in classes for k in c], minlength=10)
    assert holders.max() - holders.min() <= 1  # 21 slots over 10 classes: 2 or 3 clients each


def test_shard_leftover_classes_are_dealt_out_and_too_many_shards_refused():
    parts = partition_shard(LABELS, 3, 2, 0)  # 6 slots < 10 classes: 4 leftovers dealt out
    counts = sorted(len(set(LABELS[p].tolist())) for p in parts)
    assert sum(counts) == 10 and counts[0] >= 2
    assert sorted(np.concatenate(parts).tolist()) == list(range(len(LABELS)))
    with pytest.raises(ConfigError, match="--shards 11 exceeds the 10 classes; valid: 1..10"):
        partition_shard(LABELS, 3, 11, 0)


def test_federated_data_uses_the_configured_partition():
    cfg = RunConfig(dataset="synthetic", clients=4, partition="shard", shards=1, batch_size=2)
    data = federated_data(cfg)
    assert all(len(set(data.private.labels[torch.as_tensor(p)].tolist())) <= 3
               for p in data.client_indices)
    iid = federated_data(RunConfig(dataset="synthetic", clients=4))
    assert len(data.private) == len(iid.private) == 800
    with pytest.raises(ConfigError, match="--partition 'nope' is not valid; valid: iid, dirichlet, shard"):
        RunConfig(partition="nope").validate_data()
    with pytest.raises(ConfigError, match="--alpha must be > 0, got 0.0"):
        RunConfig(alpha=0.0).validate_data()


# --- on-disk formats, faked -----------------------------------------------------------------

def _write_idx(path, array: np.ndarray) -> None:
    magic = 0x0800 + array.ndim  # unsigned byte data
    path.write_bytes(struct.pack(f">I{array.ndim}I", magic, *array.shape) + array.astype(np.uint8).tobytes())


def test_mnist_idx_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _write_idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (6, 28, 28)))
    _write_idx(raw / "train-labels-idx1-ubyte", np.arange(6))
    _write_idx(raw / "t10k-images-idx3-ubyte", np.full((4, 28, 28), 255))
    _write_idx(raw / "t10k-labels-idx1-ubyte", np.array([9, 8, 7, 6]))
    data = federated_data(RunConfig(dataset="mnist", data_root=str(tmp_path), clients=2))
    assert data.private.images.shape == (6, 3, 32, 32) and len(data.public) == 4  # train / test
    assert data.private.labels.tolist() == list(range(6)) and data.public.labels.tolist() == [9, 8, 7, 6]
    assert torch.allclose(data.public.images, torch.ones(1)) and data.private.class_names[9] == "nine"


def _cifar_batch(n: int, label_key: str, rng) -> dict:
    return {"batch_label": "fake", label_key: rng.integers(0, 10, n).tolist(),
            "data": rng.integers(0, 256, (n, 3072)).astype(np.uint8), "filenames": ["x.png"] * n}


CIFAR10_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _write_cifar10(root, protocol: int = 2):
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {f"data_batch_{i}": _cifar_batch(2, "labels", rng) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(3, "labels", rng)
    batches["data_batch_1"]["data"][0] = np.repeat([255, 0, 0], 1024)  # first image pure red
    batches["batches.meta"] = {"label_names": CIFAR10_NAMES, "num_vis": 3072}
    for name, content in batches.items():
        (folder / name).write_bytes(pickle.dumps(content, protocol=protocol))
    return batches


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_cifar10_python_batches(tmp_path, protocol):
    batches = _write_cifar10(tmp_path, protocol)
    data = federated_data(RunConfig(dataset="cifar10", data_root=str(tmp_path), clients=2))
    assert len(data.private) == 10 and len(data.public) == 3
    assert list(data.private.class_names) == CIFAR10_NAMES
    assert data.public.labels.tolist() == batches["test_batch"]["labels"]
    red = data.private.images[0]
    assert torch.allclose(red[0], torch.ones(1)) and torch.allclose(red[1:], torch.zeros(1))


def test_cifar100_python_files(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    names = [f"class_{k}" for k in range(99)] + ["aquarium_fish"]
    for name, n in (("train", 8), ("test", 4)):
        batch = _cifar_batch(n, "fine_labels", rng)
        batch["coarse_labels"] = [0] * n
        (folder / name).write_bytes(pickle.dumps(batch))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": names, "coarse_label_names": ["x"]}))
    data = load_dataset(RunConfig(dataset="cifar100", data_root=str(tmp_path), image_size=16))
    assert data.images.shape == (12, 3, 16, 16) and data.test_start == 8
    assert data.num_classes == 100 and data.class_names[-1] == "aquarium fish"


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_malicious_cifar_pickle_is_refused_without_running(tmp_path):
    _write_cifar10(tmp_path)
    marker = tmp_path / "pwned"
    evil = {"labels": [0], "data": _Exploit(marker)}
    (tmp_path / "cifar-10-batches-py" / "data_batch_3").write_bytes(pickle.dumps(evil))
    refused = r"data_batch_3 is not a CIFAR python batch: refusing to load .*system"
    with pytest.raises(ConfigError, match=refused):
        load_dataset(RunConfig(dataset="cifar10", data_root=str(tmp_path), image_size=8))
    assert not marker.exists()
    (tmp_path / "eval.pkl").write_bytes(pickle.dumps({"x": eval}))
    with pytest.raises(ConfigError, match="refusing to load builtins.eval"):
        read_cifar_pickle(tmp_path / "eval.pkl")


def _write_jpegs(folder, count: int, grey: bool = False):
    folder.mkdir(parents=True)
    for k in range(count):
        size = (40 + 7 * k, 30 + 5 * k)
        image = Image.new("L" if grey else "RGB", size, 200 if grey else (255, 30 * k, 0))
        image.save(folder / f"image_{k + 1:04d}.jpg")


def test_caltech101_folders(tmp_path):
    categories = tmp_path / "caltech101" / "101_ObjectCategories"
    _write_jpegs(categories / "BACKGROUND_Google", 2)
    _write_jpegs(categories / "Faces_easy", 4, grey=True)
    _write_jpegs(categories / "accordion", 3)
    _write_jpegs(categories / "yin_yang", 3)
    data = federated_data(RunConfig(dataset="caltech101", data_root=str(tmp_path), clients=2))
    assert data.private.class_names == ("faces easy", "accordion", "yin yang")
    assert len(data.private) + len(data.public) == 10 and len(data.public) == 2  # seeded 20 %
    full = load_dataset(RunConfig(dataset="caltech101", data_root=str(tmp_path)))
    assert full.labels.tolist() == [0] * 4 + [1] * 3 + [2] * 3 and full.images.shape[1:] == (3, 32, 32)
    assert torch.allclose(full.images[0], torch.full((1,), 200 / 255), atol=0.02)  # grey -> RGB


def test_imagefolder(tmp_path):
    _write_jpegs(tmp_path / "red fox", 3)
    Image.new("RGB", (10, 10), (0, 0, 255)).save(tmp_path / "zebra.png")  # stray file: ignored
    (tmp_path / "zebra").mkdir()
    Image.new("RGBA", (20, 12), (0, 0, 255, 255)).save(tmp_path / "zebra" / "a.png")
    Image.new("RGB", (9, 9), (0, 0, 255)).save(tmp_path / "zebra" / "b.PNG")
    (tmp_path / "zebra" / "notes.txt").write_text("not an image")
    data = load_dataset(RunConfig(dataset="imagefolder", data_root=str(tmp_path), image_size=12))
    assert data.class_names == ("red fox", "zebra") and data.labels.tolist() == [0, 0, 0, 1, 1]
    assert data.images.shape == (5, 3, 12, 12) and torch.allclose(data.images[3:, 2], torch.ones(1))
    (tmp_path / "zebra" / "broken.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(ConfigError, match="cannot read image .*broken.jpg"):
        load_dataset(RunConfig(dataset="imagefolder", data_root=str(tmp_path), image_size=13))


@pytest.mark.parametrize("name,where", [("mnist", "MNIST/raw"), ("cifar10", "cifar-10-batches-py"),
                                        ("cifar100", "cifar-100-python"),
                                        ("caltech101", "caltech101/101_ObjectCategories")])
def test_missing_files_say_where_and_what(tmp_path, name, where):
    with pytest.raises(ConfigError) as err:
        load_dataset(RunConfig(dataset=name, data_root=str(tmp_path)))
    assert str(tmp_path / where) in str(err.value) and "--data-root" in str(err.value)


def test_imagefolder_needs_a_data_root(tmp_path):
    with pytest.raises(ConfigError, match="--dataset imagefolder needs --data-root DIR"):
        RunConfig(dataset="imagefolder").validate_data()
    with pytest.raises(ConfigError, match="has no class sub-folders"):
        load_dataset(RunConfig(dataset="imagefolder", data_root=str(tmp_path)))


def test_failed_download_is_a_config_error(tmp_path, monkeypatch):
    import torchvision.datasets.utils

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.datasets.utils, "download_and_extract_archive", offline)
    with pytest.raises(ConfigError, match=r"downloading into .* failed \(no network\)"):
        load_dataset(RunConfig(dataset="cifar10", data_root=str(tmp_path), download=True))


# --- fedsim data describe -------------------------------------------------------------------

def test_describe_prints_clients_classes_and_public_split():
    result = CliRunner().invoke(app, ["data", "describe", "--dataset", "faces", "--clients", "3",
                                      "--partition", "shard", "--shards", "1"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert "faces: 160 private images across 3 clients (shard, 1 classes each), 40 public" in " ".join(
        " ".join(lines).split())
    client_rows = [line.split() for line in lines if line.split()[:1] in (["0"], ["1"], ["2"])]
    assert len(client_rows) == 3 and sum(int(row[1]) for row in client_rows) == 160
    assert all(row[2] == "1" for row in client_rows)  # one class each
    assert any(line.split()[:2] == ["public", "40"] for line in lines)


def test_describe_reports_bad_values():
    result = CliRunner().invoke(app, ["data", "describe", "--partition", "nope"])
    assert result.exit_code == 2 and "valid: iid, dirichlet, shard" in result.output


def test_garbled_files_are_config_errors(tmp_path):
    _write_cifar10(tmp_path)
    (tmp_path / "cifar-10-batches-py" / "test_batch").write_bytes(b"\x80\x04garbage")
    with pytest.raises(ConfigError, match="test_batch is not a CIFAR python batch"):
        load_dataset(RunConfig(dataset="cifar10", data_root=str(tmp_path), image_size=9))
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
                 "t10k-labels-idx1-ubyte"):
        (raw / name).write_bytes(b"\x00\x00\x08")
    with pytest.raises(ConfigError, match="not MNIST idx files"):
        load_dataset(RunConfig(dataset="mnist", data_root=str(tmp_path), image_size=9))
