"""A first-order estimate of the memory a run needs, so that `fedsim run` can refuse, before any
work and with the numbers, a run this machine cannot hold (`check_memory`).

`estimate(cfg)` builds nothing and loads nothing (it takes well under a millisecond): it reads
the architecture's sizes from the model's config JSON (fedsim's tiny CLIP, open_clip's
model_configs) or from the classic models' definitions, the datasets' sizes from constants, and
adds up, in float32 bytes:

- runtime: one process with torch, open_clip, Flower and pandas imported (RUNTIME_BYTES);
- dataset: loaders hold the whole dataset as [N, 3, S, S] at --image-size S, and a run keeps
  several copies: the loaded set; the private/public split (a copy, or views where the public
  split is an official test split); the attacker's clone of the public split; the server's
  evaluation half; in process, the client side's own split and clone; plus DATASET_SLACK;
- weights: every parameter, plus UPDATE_COPIES of the trainable ones (gradients, updates and
  their serialised copies, the observation, the attack's target);
- training: the client's batch and, when gradients run through the image tower (classic
  models; CLIP with vpt, lora on the image tower, full), TRAIN_FACTOR x the activations its
  forward saves; a trainable text side (coop, text/double adapter, lora on the text tower, full)
  adds the text tower over the class prompts; a frozen tower under a head costs one layer per
  image (no graph). A defense adds to it: DP-SGD's per-example gradients, Soteria's Jacobian
  [units, B, 3, S, S];
- attack: gradient matching (dlg, idlg, ig, gradinversion, mip on visual-side PEFT) runs a
  double backward: SECOND_ORDER x the activations of every image it optimises at once (batch x
  restarts where restarts are vectorised: ig, gradinversion; DLG runs them one after another)
  when the trainable parameters sit in the image tower, TRAIN_FACTOR x when the tower is frozen
  (the double backward then stays in the head and the text tower), plus the dummy images'
  optimiser state (DUMMY_COPIES images each; L-BFGS also keeps two flat vectors per
  remembered step). MIP on text- or head-side PEFT fits its learned prior on shifted copies of
  the public split (kernel ridge: RIDGE_BYTES per anchor pixel and RIDGE_KERNELS n x n float64
  matrices), then inverts the image tower (first order);
- scoring: the scorer compares each reconstruction with the public gallery pixel by pixel,
  materialising [B, 1 + 256, 3, S, S] tensors (SCORING_COPIES of them): at large S and B
  this is the largest part;
- evaluation: the server's accuracy on the public evaluation half, 256 images at a time.
The phases add up rather than take turns (the allocator keeps much of what a phase frees; the
measurements below agree with the sum), except the evaluation at a round's end, which reuses
what the attack and scoring held: total = runtime + dataset + weights + training + defense +
max(attack + scoring, evaluation), plus, under --engine ray, every busy worker's own runtime
(WORKER_BYTES, its private pages), dataset copies, weights and training, and Ray's processes.

Activations one forward saves per image, by architecture:
- ViT towers (open_clip VisionTransformer): CLIPClassifier resizes every image to the tower's
  own input size R, so tokens T = (R / patch)^2 + 1 (+ VPT tokens) do not depend on
  --image-size (only the input does); per layer (VIT_TOKEN_FLOATS + 3 x mlp_ratio) x T x width
  for the token tensors and ATTENTION_MAPS x T^2 x heads for the attention maps (the math kernel
  that double backward needs materialises them); the text tower likewise per class prompt;
- open_clip ModifiedResNets (RN50...): RESNET_FLOATS_PER_PIXEL x width x sum(layers) per pixel
  at the tower's resolution (a count over ResNet-50's feature maps);
- classic models (which run at --image-size): LeNet's and ConvNet's feature maps counted from
  fedsim/models/classic.py (the pools' int64 indices as two floats), ResNet-18 per pixel;
- towers open_clip builds from timm or Hugging Face have no widths in their JSON: they are
  sized from the name (tiny ... enormous, patchN) as ViTs, and the estimate says so.
Not calibrated here (no weights, or too slow on 2 CPU cores): ModifiedResNets, timm and
Hugging Face towers, ResNet-18, and the Ray engine.

Calibration, on a 2-core CPU machine with 24 GiB: the peak resident set (ru_maxrss) of each
`fedsim run --engine inprocess --clients 1 --rounds 1 --attack-iters 2` with the options below
(digits; --image-size, --batch-size, --attack, r2 = --attack-restarts 2; "none" rows have
--attack none and the named defense; ViT-S-32-alt with --pretrained none), measured by

    PYTHONPATH=. .venv/bin/python benchmarks/memory_estimate.py --all

    config                       estimate measured est/meas
    tiny-clip 32 b1 dlg             1.17G    1.17G     1.00
    tiny-clip 64 b4 dlg             1.55G    1.45G     1.07
    tiny-clip 128 b8 dlg            3.60G    3.42G     1.05
    tiny-clip 128 b8 none           2.36G    2.41G     0.98
    tiny-clip 64 b4 ig r2           1.54G    1.48G     1.04
    tiny-clip 32 b1 mip             3.81G    3.88G     0.98
    tiny-clip 64 b1 mip             6.54G    6.50G     1.01
    lenet 32 b1 dlg                 1.14G    1.18G     0.97
    lenet 64 b4 dlg                 1.53G    1.42G     1.08
    lenet 64 b4 soteria             4.20G    4.11G     1.02
    convnet 32 b4 ig                1.23G    1.22G     1.01
    convnet 64 b8 ig                1.81G    1.86G     0.97
    convnet 64 b4 dlg               1.76G    1.81G     0.97
    convnet 128 b8 ig               4.07G    4.08G     1.00
    convnet 128 b4 dp               4.08G    3.96G     1.03
    ViT-S-32-alt adapter b16 ig     1.83G    1.90G     0.96
    ViT-S-32-alt full b1 ig         3.10G    3.22G     0.96
Within 10 % everywhere there; larger runs are extrapolations of the same terms, so expect a
first-order answer (a factor of 2), not a promise.
"""

from __future__ import annotations

import copy
import json
import os
import re
from dataclasses import dataclass, field
from functools import lru_cache
from importlib.util import find_spec
from pathlib import Path

from fedsim.config import CLASSIC_MODELS, IMAGE_SIZES, ConfigError, RunConfig

__all__ = ["MemoryEstimate", "estimate", "available_bytes", "check_memory", "MEMORY_FRACTION"]

GiB = 2 ** 30
FLOAT = 4  # bytes: everything runs in float32

# -- constants (module docstring; calibrated with benchmarks/memory_estimate.py) ---------------
RUNTIME_BYTES = 1.05 * GiB  # resident after importing fedsim.runner (torch alone: 0.65 GiB)
WORKER_BYTES = 0.6 * GiB  # a Ray worker's own pages (the shared libraries counted once)
RAY_BYTES = 0.6 * GiB  # Ray's own processes (GCS, raylet) under --engine ray
DATASET_SLACK = 0.35  # dataset copies beyond the counted ones (transients)
UPDATE_COPIES = 8  # trainable-sized tensors alive besides the weights
TRAIN_FACTOR = 1.5  # a forward's saved activations -> what forward and backward add
SECOND_ORDER = 2.0  # a forward's saved activations -> what a double backward adds
DUMMY_COPIES = 8  # image-sized tensors per optimised image: units, pixels, gradients, Adam's moments
VIT_TOKEN_FLOATS = 4.0  # per token and unit of width and layer, besides the MLP's 3 x mlp_ratio
ATTENTION_MAPS = 1.5  # T x T x heads tensors per layer
RESNET_FLOATS_PER_PIXEL = 0.84  # open_clip ModifiedResNet, x width x sum(layers)
RESNET18_FLOATS_PER_PIXEL = 120.0  # torchvision ResNet-18's feature maps per input pixel
RIDGE_BYTES = 32  # per anchor pixel while fitting MIP's ridge prior (float32 images, float64 copies)
RIDGE_KERNELS = 3  # n x n float64 matrices alive at once while fitting it
SCORING_COPIES = 3  # [B, 1 + gallery, 3, S, S] tensors of the scorer's pixel identifiability
MEMORY_FRACTION = 0.9  # check_memory refuses an estimate above this share of the available memory
SKIP_ENV = "FEDSIM_MEMORY_CHECK"  # 0: check_memory only estimates

# -- datasets: images and classes; public = the official test split, else PUBLIC_FRACTION -----
DATASETS = {"digits": (1797, 10), "faces": (200, 2), "photos": (600, 10), "mnist": (70000, 10),
            "cifar10": (60000, 10), "cifar100": (60000, 100), "caltech101": (8677, 101)}
TEST_SPLITS = {"mnist": 10000, "cifar10": 10000, "cifar100": 10000}
PUBLIC_FRACTION = 0.2  # fedsim.data.PUBLIC_FRACTION
GALLERY = 256  # the scorer's gallery; also how many images MIP encodes and the server evaluates at once
RIDGE_SHIFTS, RIDGE_ANCHORS, CONV_SHIFTS = 25, 10_000, 9  # attacks.decoders: shifted copies, cap

# -- towers whose JSON has no widths (timm, Hugging Face): (name word, width, layers) ---------
SIZE_WORDS = (("enormous", 1792, 64), ("gigantic", 1664, 48), ("bigg", 1664, 48), ("giant", 1408, 40),
              ("so400m", 1152, 27), ("xxlarge", 1536, 36), ("xlarge", 1280, 32), ("huge", 1280, 32),
              ("-xl", 2048, 24), ("large", 1024, 24), ("base", 768, 12), ("medium", 512, 12),
              ("small", 384, 12), ("tiny", 192, 12), ("1.3b", 1024, 24), ("600m", 1024, 12))


@dataclass(frozen=True)
class MemoryEstimate:
    """An estimate in bytes: `total`, made of the byte-valued `parts` (runtime, dataset, weights,
    training, defense, attack, scoring, evaluation, clients), which also hold what they come
    from: dataset_images, dataset_copies, image_size, activations_per_image (bytes one forward
    saves per image), images (optimised at once by the attack, else the client's batch) and
    attack_factor (on those images' activations). `attack_kind` says what the attack's bytes are."""

    total: int
    parts: dict[str, float]
    device: str = "auto"  # as configured (check_memory resolves auto)
    attack_kind: str = ""
    notes: tuple[str, ...] = field(default=())

    @property
    def host(self) -> int:
        """What stays in host memory on any device: runtime, dataset, Ray's workers."""
        return int(self.parts["runtime"] + self.parts["dataset"] + self.parts["clients"])

    def describe(self) -> str:
        """One line: the total, then its parts, the attack's first."""
        p = self.parts
        items = []
        if p["attack"]:
            items.append(f"attack {_size(p['attack'])}: {self.attack_kind}")
        if p["scoring"]:
            items.append(f"scoring against the public gallery {_size(p['scoring'])}")
        if p["evaluation"] > p["attack"] + p["scoring"]:
            items.append(f"evaluating the global model {_size(p['evaluation'])}")
        items.append(f"training {_size(p['training'])}" + (f", defense {_size(p['defense'])}" if p["defense"] else ""))
        items.append(f"weights {_size(p['weights'])}")
        items.append(f"dataset {_size(p['dataset'])}: {p['dataset_images']:,.0f} images at {p['image_size']:g} px "
                     f"x {p['dataset_copies']:g} copies")
        items.append(f"runtime {_size(p['runtime'])}")
        if p["clients"]:
            items.append(f"Ray workers {_size(p['clients'])}")
        return f"about {_size(self.total)} ({'; '.join(items)})" + "".join(f"; {note}" for note in self.notes)


def _size(n: float) -> str:
    return f"{n / GiB:,.1f} GiB" if n >= GiB / 10 or n == 0 else f"{n / 2 ** 20:,.1f} MiB"


# -- architectures --------------------------------------------------------------------------
@dataclass(frozen=True)
class _Arch:
    params: float  # every parameter
    trainable: float  # the parameters the PEFT method trains
    act: float  # floats one forward saves per image (the input at --image-size included)
    layer: float  # floats of the largest layer per image: what a forward without a graph holds
    text_act: float = 0.0  # floats the text tower saves over all class prompts, when it trains
    feature: float = 0.0  # width of the representation Soteria differentiates
    deep: bool = True  # the trainable parameters' gradients run through the image tower
    tower_px: int = 0  # CLIP: the image tower's input side
    note: str = ""


@lru_cache(maxsize=None)
def _clip_config(name: str) -> dict:
    """The model's config JSON, read from the file (open_clip is not imported); {} if none."""
    if name == "tiny-clip":
        path = Path(__file__).parent / "models" / "configs" / "fedsim-tiny-clip.json"
    else:
        spec = find_spec("open_clip")
        if spec is None or not spec.submodule_search_locations:
            return {}
        path = Path(list(spec.submodule_search_locations)[0]) / "model_configs" / f"{name}.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _guess(name: str) -> tuple[int, int]:
    low = name.lower()
    return next(((w, n) for word, w, n in SIZE_WORDS if word in low), (768, 12))


def _transformer(tokens: float, width: float, layers: float, heads: float, mlp: float = 4.0) -> float:
    """Floats one sequence saves through a transformer (module docstring)."""
    return layers * (tokens * width * (VIT_TOKEN_FLOATS + 3 * mlp) + ATTENTION_MAPS * tokens ** 2 * heads)


def _blocks(width: float, layers: float, mlp: float = 4.0) -> float:
    """Parameters of transformer blocks: attention 4 w^2, MLP 2 mlp w^2."""
    return layers * (4 + 2 * mlp) * width ** 2


def _clip_arch(cfg: RunConfig, classes: int) -> _Arch:
    config = _clip_config(cfg.model)
    vision, text = config.get("vision_cfg", {}), config.get("text_cfg", {})
    notes = [] if config else [f"no config found for {cfg.model}: sized from its name"]
    embed = config.get("embed_dim", 512)
    size = vision.get("image_size", 224)
    size = int(size[0] if isinstance(size, (list, tuple)) else size)
    if isinstance(vision.get("layers"), (list, tuple)):  # open_clip ModifiedResNet (RN50, ...)
        w, stages = vision.get("width", 64), vision["layers"]
        v_width, v_layers = 32 * w, sum(stages)
        v_params = 17 * w ** 2 * sum(n * 4 ** i for i, n in enumerate(stages)) + 4 * v_width ** 2
        act = RESNET_FLOATS_PER_PIXEL * w * sum(stages) * size ** 2
        layer = 2 * w * (size // 2) ** 2  # the stem's feature maps
    else:
        if vision.get("timm_model_name") or not config:
            named = vision.get("timm_model_name") or cfg.model
            v_width, v_layers = _guess(named)
            found = re.search(r"patch(\d+)", named) or re.search(r"-(\d+)(?:-|$)", cfg.model)
            patch = int(found.group(1)) if found else 16
            notes.append(f"{cfg.model}'s image tower sized from its name as a ViT (width {v_width}, "
                         f"{v_layers} layers, patch {patch})")
        else:
            v_width, v_layers, patch = vision.get("width", 768), vision.get("layers", 12), vision.get("patch_size", 16)
        heads, mlp = max(1, v_width // vision.get("head_width", 64)), vision.get("mlp_ratio", 4.0)
        tokens = (size // patch) ** 2 + 1 + (cfg.vpt_tokens if cfg.peft == "vpt" else 0)
        v_params = _blocks(v_width, v_layers, mlp) + (3 * patch ** 2 + tokens) * v_width
        act = _transformer(tokens, v_width, v_layers, heads, mlp) + 2 * tokens * v_width
        layer = tokens * (2 * mlp * v_width + tokens * heads)  # the MLP's hidden tensors, the attention map
    act += 2 * 3 * size ** 2 + 3 * cfg.image_size ** 2  # the input, resized and normalised
    v_params += v_width * embed
    if text.get("hf_model_name") or not text.get("width"):
        t_width, t_layers = _guess(text.get("hf_model_name") or "base")
        vocab = 250_000 if re.search(r"xlm|mt5|nllb", text.get("hf_model_name") or "") else 50_000
        t_heads, ctx = t_width // 64, 77
    else:
        t_width, t_layers, t_heads = text["width"], text.get("layers", 12), text.get("heads", 8)
        vocab, ctx = text.get("vocab_size", 49408), text.get("context_length", 77)
    params = v_params + _blocks(t_width, t_layers) + (vocab + ctx + embed) * t_width
    text_lora = cfg.lora_tower in ("text", "both")
    targets = {t.strip() for t in cfg.lora_targets.split(",")}
    lora = cfg.lora_rank * (6 * ("attn" in targets) + 5 * ("c_fc" in targets) + 5 * ("c_proj" in targets))
    adapter = 2 * embed * max(embed // cfg.adapter_reduction, 1)
    trainable = {
        "coop": cfg.n_ctx * t_width * (classes if cfg.coop_class_specific else 1),
        "adapter": adapter, "text-adapter": adapter, "double-adapter": 2 * adapter,
        "lora": lora * (v_width * v_layers * (cfg.lora_tower != "text") + t_width * t_layers * text_lora),
        "vpt": cfg.vpt_tokens * v_width,
        "linear-probe": (embed + 1) * classes,
    }.get(cfg.peft, params)
    text_trains = cfg.peft in ("coop", "text-adapter", "double-adapter", "full") or (cfg.peft == "lora" and text_lora)
    text_act = classes * _transformer(ctx, t_width, t_layers, t_heads) if text_trains else 0.0
    deep = cfg.peft in ("vpt", "full") or (cfg.peft == "lora" and cfg.lora_tower != "text")
    return _Arch(params, trainable, act, layer, text_act, embed, deep, size, "; ".join(notes))


def _classic_arch(cfg: RunConfig, classes: int) -> _Arch:
    s = cfg.image_size
    if cfg.model == "lenet":
        half, quarter = (-(-s // 2)) ** 2, (-(-s // 4)) ** 2  # stride-2 convolutions round up
        feature = 12 * quarter
        params = 3 * 12 * 25 + 2 * 12 * 12 * 25 + 36 + (feature + 1) * classes
        act = 3 * s * s + 2 * 12 * half + 4 * 12 * quarter  # the input, convolutions and sigmoids
        layer = 2 * 12 * half
    elif cfg.model == "convnet":
        w, full, half, quarter = 32, s * s, (s // 2) ** 2, (s // 4) ** 2  # max-pools round down
        feature = 4 * w * quarter
        params = 9 * (3 * w + w * 2 * w + 2 * w * 4 * w) + 7 * w + (feature + 1) * classes
        # the input, convolution/ReLU pairs, the pools' outputs and int64 indices
        act = 3 * full + 2 * w * full + 2 * 2 * w * full + 3 * 2 * w * half + 2 * 4 * w * half + 3 * 4 * w * quarter
        layer = 2 * 2 * w * full
    else:  # torchvision resnet18
        feature = 512
        params = 11_176_512 + 513 * classes
        act = (RESNET18_FLOATS_PER_PIXEL + 3) * s * s
        layer = 2 * 64 * (s // 2) ** 2
    return _Arch(params, params, act, layer, feature=feature)


def _dataset(cfg: RunConfig) -> tuple[int, int, int, bool]:
    """(images, public images, classes, whether the public split is an official test split)."""
    if cfg.dataset == "synthetic":
        n, classes = cfg.synthetic_classes * cfg.synthetic_size, cfg.synthetic_classes
    elif cfg.dataset in ("imagefolder", "caltech101") and cfg.data_root:
        root = Path(cfg.data_root).expanduser()
        root = root / "caltech101" / "101_ObjectCategories" if cfg.dataset == "caltech101" else root
        n, classes = _count_images(root) if root.is_dir() else DATASETS.get(cfg.dataset, (0, 1))
    else:
        n, classes = DATASETS.get(cfg.dataset, (0, 10))
    public = TEST_SPLITS.get(cfg.dataset, round(PUBLIC_FRACTION * n))
    return n, public, max(classes, 1), cfg.dataset in TEST_SPLITS


def _count_images(root: Path) -> tuple[int, int]:
    """(images, class folders) under an image folder, counted by name, not read."""
    from fedsim.datasets.files import IMAGE_EXTENSIONS

    n = classes = 0
    for entry in os.scandir(root):
        if entry.is_dir() and not entry.name.startswith(".") and entry.name != "BACKGROUND_Google":
            classes += 1
            n += sum(os.path.splitext(f.name)[1].lower() in IMAGE_EXTENSIONS for f in os.scandir(entry.path))
    return n, classes


# -- the estimate ---------------------------------------------------------------------------
def estimate(cfg: RunConfig) -> MemoryEstimate:
    """The memory `cfg` needs at its peak (module docstring), without building the model or
    loading data."""
    n, public, classes, test_split = _dataset(cfg)
    arch = _classic_arch(cfg, classes) if cfg.model in CLASSIC_MODELS else _clip_arch(cfg, classes)
    s, batch = cfg.image_size, cfg.batch_size
    image = 3 * s * s * FLOAT
    split, f = (0 if test_split else 1), (public / n if n else 0)
    server_copies, client_copies = 1 + split + 1.5 * f + DATASET_SLACK, split + f
    ray = cfg.engine == "ray"
    copies = server_copies + (0 if ray else client_copies)
    dataset = n * image * copies
    weights = (arch.params + UPDATE_COPIES * arch.trainable) * FLOAT
    act = arch.act * FLOAT
    if arch.deep:
        training = TRAIN_FACTOR * (batch * act + arch.text_act * FLOAT)
    else:  # a frozen tower under a trainable head: no graph through it
        training = TRAIN_FACTOR * arch.text_act * FLOAT + batch * arch.layer * FLOAT
    training += batch * image  # the client's batch, indexed out of its data
    defense = _defense(cfg, arch, batch, act)
    attack, images, factor, kind = _attack(cfg, arch, public, batch, act, image)
    scoring = SCORING_COPIES * batch * (min(GALLERY, public) + 1) * image if cfg.attack != "none" else 0.0
    evaluation = min(GALLERY, public - public // 2) * arch.layer * FLOAT
    clients = 0.0
    if ray:  # each busy worker imports fedsim, loads and splits the dataset and trains a client
        workers = min(max(1, round(cfg.clients * cfg.fraction)), os.cpu_count() or 1)
        clients = RAY_BYTES + workers * (WORKER_BYTES + n * image * (1 + client_copies) + weights + training + defense)
    total = RUNTIME_BYTES + dataset + weights + training + defense + max(attack + scoring, evaluation) + clients
    parts = {"runtime": RUNTIME_BYTES, "dataset": dataset, "weights": weights, "training": training,
             "defense": defense, "attack": attack, "scoring": scoring, "evaluation": evaluation, "clients": clients,
             "dataset_images": n, "dataset_copies": round(copies, 2), "image_size": s,
             "activations_per_image": act, "images": images if factor else batch, "attack_factor": factor}
    return MemoryEstimate(int(total), parts, cfg.device, kind, (arch.note,) if arch.note else ())


def _defense(cfg: RunConfig, arch: _Arch, batch: int, act: float) -> float:
    chain = {name.strip() for name in cfg.defense.split(",")}
    extra = 0.0
    if "dp" in chain:  # per-example gradients (vmap), their clipped copies, and the vmapped forward
        extra += 3 * batch * arch.trainable * FLOAT + TRAIN_FACTOR * batch * act
    if "soteria" in chain:  # d r / d x for every representation unit [F, B, 3, S, S], and the vjps
        extra += arch.feature * batch * (2 * 3 * cfg.image_size ** 2 + 1.5 * arch.layer) * FLOAT
    return extra


def _attack(cfg: RunConfig, arch: _Arch, public: int, batch: int, act: float, image: float):
    """(bytes, images optimised at once, factor on their activations, what the bytes are for)."""
    name = cfg.attack
    restarts = int(cfg.options.get("attack_restarts") or 1)
    iterations = cfg.options.get("attack_iters")
    if name == "none" or (name == "mip" and cfg.model in CLASSIC_MODELS):  # MIP refuses classic models
        return 0.0, 0, 0.0, ""
    if name == "mip":
        visual = arch.deep
        prior = cfg.options.get("mip_prior", "ridge")
        if visual and prior != "tv":  # attacks.tower_side: per-example gradients of public chunks, a blend fit
            chunk = max(1, min(128, 2 ** 28 // max(int(arch.trainable), 1)))
            atoms = TRAIN_FACTOR * chunk * act + 2 * chunk * arch.trainable * FLOAT
            fit = SECOND_ORDER * (batch * act + arch.text_act * FLOAT)
            return max(atoms, fit), batch, SECOND_ORDER, (
                f"per-example gradients of {chunk} public images at a time, then second-order gradients")
        if not visual:  # a learned prior, then the image-tower inversion (first order)
            fit, what = min(GALLERY, public) * arch.layer * FLOAT, "encoding public images"
            if prior == "ridge":
                anchors = min(RIDGE_SHIFTS * public, RIDGE_ANCHORS)
                fit += anchors * (image / FLOAT) * RIDGE_BYTES + RIDGE_KERNELS * anchors ** 2 * 8
                what = f"fitting the ridge prior on {anchors:,} shifted public images"
            elif prior == "conv":
                fit += 2 * CONV_SHIFTS * public * image + TRAIN_FACTOR * 64 * act
                what = f"training the conv prior on {CONV_SHIFTS * public:,} shifted public images"
            images = batch * restarts * (2 if arch.tower_px > 64 else 1)  # attacks.encoder_inversion
            invert = TRAIN_FACTOR * images * act + DUMMY_COPIES * images * image
            if invert > fit:
                what = f"{_size(act)} activations per image x {images} images x {TRAIN_FACTOR:g} to invert the tower"
            return max(fit, invert), images, TRAIN_FACTOR, what
        name = "ig"  # visual-side PEFT under --mip-prior tv: Inverting Gradients with joint labels
    parallel = 1 if name in ("dlg", "idlg") else restarts  # DLG's restarts run one after another
    images = batch * parallel
    state = DUMMY_COPIES * images * image
    if name in ("dlg", "idlg"):  # L-BFGS: two flat vectors of all variables per remembered step
        state += 2 * min(100, 20 * (iterations if iterations is not None else 300)) * batch * image
    factor = SECOND_ORDER if arch.deep else TRAIN_FACTOR
    text = SECOND_ORDER * parallel * arch.text_act * FLOAT
    what = (f"{_size(act)} activations per image x {images} images x {factor:g} for the "
            + ("second-order gradients" if arch.deep else "gradients through the frozen tower")
            + (f", {_size(text)} for the text tower's" if text else "")
            + f", {_size(state)} for the dummy images' optimiser")
    return factor * images * act + text + state, images, factor, what


# -- what is available ----------------------------------------------------------------------
def _device(name: str) -> str:
    if name != "auto":
        return name
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def available_bytes(device: str = "cpu") -> int:
    """Free memory for a run on `device`: for cuda, the GPU's free memory (torch.cuda.mem_get_info);
    else the host's MemAvailable (/proc/meminfo; os.sysconf's free pages where there is none),
    capped by the room left under this process's cgroup memory limit."""
    if _device(device) == "cuda":
        import torch

        if torch.cuda.is_available():
            return int(torch.cuda.mem_get_info()[0])
    free = None
    try:
        with open("/proc/meminfo") as meminfo:
            free = next((int(line.split()[1]) * 1024 for line in meminfo if line.startswith("MemAvailable:")), None)
    except OSError:
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            free = 0
    room = _cgroup_room()
    return int(free if room is None else min(free, room))


def _cgroup_room() -> int | None:
    """Memory left under the cgroup's limit (v2, else v1), counting its inactive page cache as
    free; None without a limit."""
    for limit_file, usage_file, stat_key in (
            ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "inactive_file"),
            ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
             "total_inactive_file")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text())
        except (OSError, ValueError):
            continue
        if limit == "max" or int(limit) >= 2 ** 60:
            return None
        cache = 0
        try:
            stat = Path(limit_file).with_name("memory.stat").read_text().split()
            cache = int(stat[stat.index(stat_key) + 1])
        except (OSError, ValueError, IndexError):
            pass
        return max(0, int(limit) - usage + cache)
    return None


# -- the check ------------------------------------------------------------------------------
def check_memory(cfg: RunConfig, fraction: float = MEMORY_FRACTION) -> MemoryEstimate:
    """Raise ConfigError when the estimate exceeds `fraction` of the available memory, naming the
    estimate, what is available and what to lower; else return the estimate. On CUDA the GPU
    must hold weights and working memory, the host the runtime and the dataset.
    FEDSIM_MEMORY_CHECK=0 turns the refusal off (the estimate is first-order)."""
    est = estimate(cfg)
    if os.environ.get(SKIP_ENV, "1") == "0":
        return est
    checks = [("", est.total, "cpu")]
    if _device(cfg.device) == "cuda":
        checks = [(" on the GPU", est.total - est.host, "cuda"), (" in host memory", est.host, "cpu")]
    for where, needed, device in checks:
        free = available_bytes(device)
        if needed > fraction * free:
            raise ConfigError(_refusal(cfg, est, where, needed, free, fraction))
    return est


def _needed(est: MemoryEstimate, where: str) -> int:
    return {"": est.total, " on the GPU": est.total - est.host, " in host memory": est.host}[where]


def _refusal(cfg: RunConfig, est: MemoryEstimate, where: str, needed: int, free: int, fraction: float) -> str:
    run = (f"--model {cfg.model} --image-size {cfg.image_size} --batch-size {cfg.batch_size} --attack {cfg.attack}"
           + (f" --defense {cfg.defense}" if cfg.defense != "none" else ""))
    fits = []
    for flag, name, low in (("--image-size", "image_size", IMAGE_SIZES[0]), ("--batch-size", "batch_size", 1)):
        trial = copy.copy(cfg)
        setattr(trial, name, getattr(cfg, name) // 2)
        while getattr(trial, name) >= low and _needed(estimate(trial), where) > fraction * free:
            setattr(trial, name, getattr(trial, name) // 2)
        if getattr(trial, name) >= low:
            fits.append(f"{flag} {getattr(trial, name)}")
    other = [] if cfg.model in ("lenet", "tiny-clip") else ["a smaller --model"]
    if int(cfg.options.get("attack_restarts") or 1) > 1:
        other.append("fewer --attack-restarts")
    if est.parts["clients"]:
        other.append("fewer --clients or --engine inprocess")
    return (f"this run ({run}) needs about {_size(needed)}{where}, but only {_size(free)} is available "
            f"(runs are refused above {fraction:.0%} of it, {_size(fraction * free)}). Estimate: {est.describe()}. "
            f"Lower --image-size or --batch-size" + (f" ({' or '.join(fits)} would fit)" if fits else "")
            + (f"; or: {', '.join(other)}" if other else "") + f". {SKIP_ENV}=0 runs it anyway.")
