"""Datasets read from files under --data-root, in torchvision's formats and layouts.

Nothing is downloaded unless --download is given; missing files raise a ConfigError that says
where they were looked for and what to put there. Everything is loaded into one float tensor
at --image-size: MNIST or CIFAR at 32 px take about 0.9 / 0.7 GB (70,000 / 60,000 images),
Caltech-101 about 0.1 GB but decoding its 8,677 JPEGs takes a while.
"""

from __future__ import annotations

import pickle
import warnings
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch

from fedsim.datasets.base import ImageDataset, labels_tensor, resize, to_images
from fedsim.datasets.embedded import DIGIT_NAMES
from fedsim.options import ConfigError

DEFAULT_ROOT = Path("~/.cache/fedsim/data")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
MNIST_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
               "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
CIFAR = {  # dataset: (archive, folder, train files, test files, meta file, label key, names key)
    "cifar10": ("cifar-10-python.tar.gz", "cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)],
                ["test_batch"], "batches.meta", "labels", "label_names"),
    "cifar100": ("cifar-100-python.tar.gz", "cifar-100-python", ["train"], ["test"], "meta",
                 "fine_labels", "fine_label_names"),
}


def resolve_root(data_root: str) -> Path:
    """--data-root, or the default cache folder when it is empty."""
    return Path(data_root or DEFAULT_ROOT).expanduser()


def _missing(dataset: str, where: Path, what: str) -> ConfigError:
    return ConfigError(f"--dataset {dataset}: no files at {where}; {what}. Pass --data-root DIR to "
                       "look elsewhere, or --download to let torchvision fetch them (needs network)")


def _download(dataset: str, root: Path, fetch) -> None:
    try:
        fetch()
    except Exception as exc:  # no network, bad mirror, missing gdown: all end the same way
        raise ConfigError(f"--dataset {dataset}: downloading into {root} failed ({exc}); put the "
                          "files there by hand and run without --download") from None


def load_mnist(image_size: int, data_root: str, download: bool) -> ImageDataset:
    """MNIST: 60,000 train + 10,000 test handwritten digits, 28x28 grey, read from torchvision's
    raw idx files in <root>/MNIST/raw. Labels 0-9 are the digit, named "zero" ... "nine"."""
    from torchvision.datasets.mnist import read_image_file, read_label_file

    root = resolve_root(data_root)
    raw = root / "MNIST" / "raw"
    if download:
        from torchvision.datasets import MNIST

        _download("mnist", root, lambda: MNIST(str(root), download=True))
    if not all((raw / name).is_file() for name in MNIST_FILES):
        raise _missing("mnist", raw, f"expected the uncompressed idx files {', '.join(MNIST_FILES)}")
    try:
        images = [read_image_file(str(raw / MNIST_FILES[i])).numpy() for i in (0, 2)]
        labels = [read_label_file(str(raw / MNIST_FILES[i])).numpy() for i in (1, 3)]
    except Exception as exc:  # torchvision asserts on the header; a truncated file fails anywhere
        raise ConfigError(f"--dataset mnist: {raw} holds files that are not MNIST idx files "
                          f"({exc!r})") from None
    n_train = len(labels[0])
    images, labels = np.concatenate(images), np.concatenate(labels)
    return ImageDataset("mnist", to_images(images, image_size), labels_tensor(labels), DIGIT_NAMES, n_train)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings and numpy arrays; any other global is refused before
    it is imported or called, so a crafted file cannot run code (pickle's usual danger)."""

    def find_class(self, module: str, name: str):
        allowed = _allowed_globals()
        if (module, name) not in allowed:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: a CIFAR batch holds "
                                         "only numpy arrays, lists, strings and dicts")
        return allowed[(module, name)]


@lru_cache(maxsize=1)
def _allowed_globals() -> dict[tuple[str, str], object]:
    import codecs

    try:
        from numpy._core.multiarray import _reconstruct
        from numpy._core.numeric import _frombuffer
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
        from numpy.core.numeric import _frombuffer
    allowed = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
               ("_codecs", "encode"): codecs.encode}  # bytes in protocol-2 pickles
    for package in ("numpy.core", "numpy._core"):  # CIFAR's files name the numpy 1.x modules
        allowed[(f"{package}.multiarray", "_reconstruct")] = _reconstruct
        allowed[(f"{package}.numeric", "_frombuffer")] = _frombuffer
    return allowed


def read_cifar_pickle(path: Path) -> dict:
    """One CIFAR python-format file (a pickled dict), through the numpy-only unpickler."""
    try:
        with open(path, "rb") as file:
            data = _NumpyOnlyUnpickler(file, encoding="latin1").load()
    except Exception as exc:  # refused globals, truncated or garbled files
        raise ConfigError(f"{path} is not a CIFAR python batch: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a CIFAR python batch: holds {type(data).__name__}, not a dict")
    return {key.decode() if isinstance(key, bytes) else key: value for key, value in data.items()}


def _load_cifar(dataset: str, image_size: int, root: Path, download: bool) -> ImageDataset:
    archive, folder, train, test, meta, label_key, names_key = CIFAR[dataset]
    if download:
        from torchvision.datasets import CIFAR10, CIFAR100
        from torchvision.datasets.utils import download_and_extract_archive

        tv = CIFAR10 if dataset == "cifar10" else CIFAR100  # only its URL: it would plain-unpickle
        _download(dataset, root, lambda: download_and_extract_archive(
            tv.url, str(root), filename=tv.filename, md5=tv.tgz_md5))
    files = [*train, *test, meta]
    if not all((root / folder / name).is_file() for name in files):
        raise _missing(dataset, root / folder, f"expected the python-format batches {', '.join(files)} "
                       f"(extract {archive} from https://www.cs.toronto.edu/~kriz/cifar.html into "
                       f"{root})")
    batches = [read_cifar_pickle(root / folder / name) for name in [*train, *test]]
    for name, batch in zip([*train, *test], batches):
        if "data" not in batch or label_key not in batch:
            raise ConfigError(f"{root / folder / name} lacks the 'data' or '{label_key}' entry of a "
                              f"{dataset} batch")
    images = np.concatenate([np.asarray(b["data"], np.uint8).reshape(-1, 3, 32, 32) for b in batches])
    labels = np.concatenate([np.asarray(b[label_key]) for b in batches])
    names = tuple(str(n).replace("_", " ") for n in read_cifar_pickle(root / folder / meta)[names_key])
    n_train = sum(len(b[label_key]) for b in batches[:len(train)])
    return ImageDataset(dataset, to_images(images, image_size), labels_tensor(labels), names, n_train)


def load_cifar10(image_size: int, data_root: str, download: bool) -> ImageDataset:
    """CIFAR-10: 50,000 train + 10,000 test 32x32 colour photos from <root>/cifar-10-batches-py.
    Labels 0-9: airplane, automobile, bird, cat, deer, dog, frog, horse, ship, truck (names
    read from batches.meta)."""
    return _load_cifar("cifar10", image_size, resolve_root(data_root), download)


def load_cifar100(image_size: int, data_root: str, download: bool) -> ImageDataset:
    """CIFAR-100: 50,000 train + 10,000 test 32x32 colour photos from <root>/cifar-100-python.
    Labels are the 100 fine classes (apple, aquarium fish, ..., worm; names read from meta,
    underscores turned into spaces); the 20 coarse superclasses are not used."""
    return _load_cifar("cifar100", image_size, resolve_root(data_root), download)


def _read_image(path: Path, image_size: int) -> torch.Tensor:
    from PIL import Image, UnidentifiedImageError

    try:
        with warnings.catch_warnings():
            # PIL only warns between its limit and twice it; both are far beyond a dataset image
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image.draft("RGB", (2 * image_size, 2 * image_size))  # JPEG: decode at reduced size
                rgb = np.asarray(image.convert("RGB"))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ConfigError(f"image {path} is refused: {exc}") from None
    except (OSError, UnidentifiedImageError) as exc:
        raise ConfigError(f"cannot read image {path}: {exc}") from None
    chw = torch.from_numpy(np.ascontiguousarray(rgb.transpose(2, 0, 1))).float()[None] / 255.0
    return resize(chw, image_size)[0]


def _load_folders(dataset: str, root: Path, classes: list[str], names: list[str],
                  image_size: int) -> ImageDataset:
    """Every image in root/<class>/, the class index being the position in `classes`."""
    images, labels = [], []
    for label, cls in enumerate(classes):
        files = sorted(p for p in (root / cls).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise ConfigError(f"--dataset {dataset}: class folder {root / cls} holds no images "
                              f"({', '.join(IMAGE_EXTENSIONS)})")
        images += [_read_image(path, image_size) for path in files]
        labels += [label] * len(files)
    return ImageDataset(dataset, torch.stack(images), labels_tensor(labels), tuple(names))


def _class_folders(root: Path) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))


def load_caltech101(image_size: int, data_root: str, download: bool) -> ImageDataset:
    """Caltech-101: about 8,677 colour photos of 101 object categories, in torchvision's layout
    <root>/caltech101/101_ObjectCategories/<category>/*.jpg; the BACKGROUND_Google clutter folder
    is left out, as torchvision does. Labels follow the sorted folder names; class names are the
    folder names in lower case with spaces ("faces easy", "accordion", ..., "yin yang"). No
    official test split, so the seeded 20 % public split applies."""
    root = resolve_root(data_root)
    folder = root / "caltech101" / "101_ObjectCategories"
    if download:
        from torchvision.datasets import Caltech101

        _download("caltech101", root, lambda: Caltech101(str(root), download=True))
    if not folder.is_dir():
        raise _missing("caltech101", folder, "expected one folder of JPEGs per category (extract "
                       "101_ObjectCategories.tar.gz from the Caltech-101 archive there)")
    classes = [c for c in _class_folders(folder) if c != "BACKGROUND_Google"]
    if not classes:
        raise _missing("caltech101", folder, "found no category folders")
    names = [c.replace("_", " ").lower() for c in classes]
    return _load_folders("caltech101", folder, classes, names, image_size)


def load_imagefolder(image_size: int, data_root: str) -> ImageDataset:
    """Any folder of class sub-folders (--data-root DIR with DIR/<class>/<image>), like
    torchvision's ImageFolder: labels follow the sorted folder names, class names are the
    folder names. No official test split, so the seeded 20 % public split applies."""
    if not data_root:
        raise ConfigError("--dataset imagefolder needs --data-root DIR, a folder with one "
                          "sub-folder of images per class")
    root = Path(data_root).expanduser()
    if not root.is_dir():
        raise ConfigError(f"--data-root {data_root} is not a directory; --dataset imagefolder needs "
                          "a folder with one sub-folder of images per class")
    classes = _class_folders(root)
    if not classes:
        raise ConfigError(f"--data-root {data_root} has no class sub-folders; put each class's "
                          "images in DIR/<class name>/")
    return _load_folders("imagefolder", root, classes, classes, image_size)
