"""The run configuration: core fields (data, model, federation, run) plus the options of the
chosen plugins, validated before any work starts, saved as YAML to rerun.

Attack and defense options are not fields here: each plugin declares its own (`fedsim.options`),
and a RunConfig holds their values by key in `options` (`RunConfig(dp_noise=0.5)` sets one).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, get_type_hints

import yaml

from fedsim.options import ConfigError, cast_number, declared, shown
from fedsim.protocol import PROTOCOLS

__all__ = ["RunConfig", "ConfigError", "CLASSIC_MODELS", "CLIP_PEFT", "GROUPS"]

PARTITIONS = ("iid", "dirichlet", "shard")
SYNTHETIC_MAX_CLASSES = 64  # 8 shapes x 8 colours
CLASSIC_MODELS = ("lenet", "convnet", "resnet18")
CLIP_PEFT = ("coop", "adapter", "text-adapter", "double-adapter", "lora", "vpt", "linear-probe", "full")
DEVICES = ("auto", "cpu", "cuda")
ENGINES = ("ray", "inprocess")
GROUPS = ("data", "model", "federation", "attack", "defense", "run")  # --help's panels, in order


def option(default, help: str, group: str):
    """A core field that is also a `fedsim run` option; `help` is its --help text, `group` its panel."""
    return field(default=default, metadata={"help": help, "group": group})


@dataclass(init=False)
class RunConfig:
    """Everything that defines a run: the core fields, and `options`, the plugin options by key."""

    clients: int = option(10, "number of simulated clients (Flower supernodes)", "federation")
    rounds: int = option(1, "federated rounds", "federation")
    batch_size: int = option(1, "images in each client's batch per round (FedSGD: one batch, one gradient)",
                             "federation")
    dataset: str = option("digits", "embedded: digits, faces, photos, synthetic; from --data-root: "
                                    "mnist, cifar10, cifar100, caltech101, imagefolder", "data")
    image_size: int = option(32, "images are resized to this many pixels per side", "data")
    data_root: str = option("", "folder holding mnist/cifar/caltech101 files in torchvision's layout, "
                                "or imagefolder's class folders; empty = ~/.cache/fedsim/data", "data")
    download: bool = option(False, "let torchvision download mnist/cifar/caltech101 into --data-root "
                                   "(needs network)", "data")
    synthetic_classes: int = option(10, "synthetic: number of shape classes (up to 8 shapes, "
                                        "then shape-and-colour pairs, at most 64)", "data")
    synthetic_size: int = option(100, "synthetic: images per class", "data")
    partition: str = option("iid", "how the private pool is split across clients: iid, dirichlet "
                                    "(label skew, see --alpha) or shard (see --shards)", "data")
    alpha: float = option(0.5, "dirichlet: concentration; smaller = each client sees fewer classes", "data")
    shards: int = option(2, "shard: classes per client", "data")
    model: str = option("tiny-clip", "tiny-clip (shipped with fedsim), any open_clip model name "
                        "(e.g. ViT-B-32), or a classic model: lenet (DLG's), convnet, resnet18", "model")
    pretrained: str = option("fedsim", "CLIP weights: fedsim = tiny-clip pre-trained by fedsim (built "
                             "and cached on first use), none = random init, an open_clip pretrained "
                             "tag (downloaded when online), or a local checkpoint file", "model")
    peft: str = option("coop", "trainable part of CLIP: " + ", ".join(CLIP_PEFT) + "; classic models: full", "model")
    n_ctx: int = option(4, "coop: number of learnable context vectors", "model")
    coop_class_specific: bool = option(False, "coop: one set of context vectors per class", "model")
    adapter_reduction: int = option(4, "adapters: bottleneck width = feature width / reduction", "model")
    adapter_ratio: float = option(0.2, "adapters: residual blend ratio alpha (output = alpha*A(f) + (1-alpha)*f)",
                                  "model")
    lora_rank: int = option(4, "lora: rank r", "model")
    lora_alpha: float = option(8.0, "lora: scaling alpha", "model")
    lora_tower: str = option("image", "lora: image, text or both towers", "model")
    lora_targets: str = option("attn", "lora: comma-separated block parts: attn (whole attention), c_fc, c_proj",
                               "model")
    vpt_tokens: int = option(4, "vpt: number of learnable visual prompt tokens", "model")
    model_seed: int = option(0, "seeds the model's initialisation (PEFT parameters, classic models); public, "
                                "part of the model description the server sends, independent of --seed", "model")
    protocol: str = option("fedsgd", "fedsgd: clients send the gradient of one batch; fedavg: clients "
                           "take local SGD steps and send the weight delta", "federation")
    lr: float = option(0.01, "learning rate: the server's step on the averaged gradient (fedsgd), "
                       "the clients' SGD step (fedavg)", "federation")
    local_steps: int = option(1, "fedavg: SGD steps on the round's batch", "federation")
    local_epochs: int = option(0, "fedavg: if > 0, passes over all the client's data instead of local steps",
                               "federation")
    fraction: float = option(1.0, "share of clients sampled each round", "federation")
    client_timeout: float = option(3600.0, "seconds the server waits for a round's replies; clients that have "
                                   "not answered by then are left out of the round (Ray engine and flwr run; the "
                                   "in-process engine calls each client to the end)", "federation")
    attack: str = option("mip", "attack run by the curious server on every client update (`fedsim list` "
                         "shows them and their options); none to skip", "attack")
    attack_seed: int = option(0, "the attack's own random seed (restarts, dummy data): the server's, "
                                 "independent of --seed", "attack")
    attack_timeout: float = option(0.0, "seconds one attack may take; past them it stops at its next reported "
                                   "iteration and its row says timeout (0: no limit)", "attack")
    defense: str = option("none", "comma-separated chain of defenses, applied in the order given "
                          "(`fedsim list` shows the installed ones and their options); none for no defense",
                          "defense")
    seed: int = option(0, "the data seed: client partition, batch schedule and the clients' own noise "
                          "(defenses). It stays with the clients: nothing the server sees depends on it", "data")
    engine: str = option("ray", "ray: Flower's simulation engine on Ray; inprocess: clients called "
                         "one after another in this process (no Ray start-up; tests, debugging)", "run")
    device: str = option("auto", "auto = CUDA when available, else CPU", "run")
    out: str = option("", "output directory; empty = runs/<timestamp>", "run")
    overwrite: bool = option(False, "replace what a non-empty output directory holds; the old files stay "
                             "whole until the new run completes", "run")
    resume: bool = option(False, "continue the interrupted run in --out: its rows are kept and skipped, the "
                          "rest come out as they would have (its config.yaml is used; other options are refused)",
                          "run")

    options: dict[str, Any] = field(default_factory=dict)

    def __init__(self, options: dict[str, Any] | None = None, **values: Any):
        """Core fields by name; plugin options by key, either as keywords or in `options`.
        Every declared plugin option gets its default, so `options` always holds them all."""
        given = {**(options or {}), **{k: v for k, v in values.items() if k not in CORE}}
        unknown = sorted(set(given) - set(declared()))
        if unknown:
            raise ConfigError(f"unknown option {', '.join(unknown)}; valid: "
                              f"{', '.join(sorted([*CORE, *declared()]))}")
        for f in fields(RunConfig):
            if f.name != "options":
                setattr(self, f.name, values.get(f.name, f.default))
        self.options = {key: d.option.cast(given.get(key, d.option.default)) for key, d in declared().items()}

    def value(self, name: str) -> Any:
        """A core field's or a plugin option's value, by name or key (`peft`, `dp_noise`)."""
        return getattr(self, name) if name in CORE else self.option(name)

    def option(self, key: str) -> Any:
        """A plugin option's value by key (`dp_noise`)."""
        if key not in self.options:
            raise ConfigError(f"unknown option {key!r}; no installed plugin declares it")
        return self.options[key]

    def plugin_options(self, plugin_class, name: str) -> dict[str, Any]:
        """A plugin's options by the names it declares them under (its constructor keywords)."""
        return {opt.name: self.options[opt.key_for(name)] for opt in getattr(plugin_class, "options", ())}

    def validate(self, strict_options: bool = True) -> None:
        """Fail fast with a message naming the bad value and the valid ones. `strict_options`:
        refuse a plugin option that neither the attack nor a defense reads (a sweep's base may
        set options that only some of its trials read)."""
        from fedsim.plugins import attack_names, defense_names

        self.validate_data()
        _positive(self, "rounds", "local_steps")
        _finite(self, "lr", "fraction", "attack_timeout", "client_timeout")
        if self.client_timeout <= 0:
            raise ConfigError(f"--client-timeout must be > 0 seconds, got {self.client_timeout}")
        if self.attack_timeout < 0:
            raise ConfigError(f"--attack-timeout must be >= 0 seconds (0: no limit), got {self.attack_timeout}")
        _choice("protocol", self.protocol, PROTOCOLS)
        if self.local_epochs < 0:
            raise ConfigError(f"--local-epochs must be >= 0, got {self.local_epochs}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"--fraction must be in (0, 1], got {self.fraction}")
        self.validate_model()
        _seed(self, "attack_seed")
        _choice("attack", self.attack, ["none", *attack_names()])
        chain = [n.strip() for n in self.defense.split(",")]
        for name in chain:
            _choice("defense", name, ["none", *defense_names()], " (a comma-separated chain)")
        if "none" in chain and len(chain) > 1:
            raise ConfigError(f"--defense {self.defense!r}: none cannot be chained with other defenses")
        repeated = sorted({n for n in chain if chain.count(n) > 1})
        if repeated:
            raise ConfigError(f"--defense {self.defense!r} names {', '.join(repeated)} more than once")
        self.validate_options(strict_options)
        _choice("device", self.device, DEVICES)
        _choice("engine", self.engine, ENGINES)
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.out:
            out = Path(self.out)
            check_writable_dir(out)
            if out.is_dir() and any(out.iterdir()) and not (self.overwrite or self.resume):
                raise ConfigError(f"--out {self.out} exists and is not empty; pass --overwrite, --resume (to "
                                  "continue an interrupted run) or choose another directory")
            if self.overwrite and self.resume:
                raise ConfigError("--overwrite and --resume contradict each other: --resume keeps the rows in "
                                  "--out, --overwrite replaces them; pass one")
        from fedsim.plugins import make_defense

        make_defense(self)  # a chain whose defenses refuse their options or each other fails here

    def validate_options(self, strict: bool = True) -> None:
        """Each plugin option against its declaration; with `strict`, a value no chosen plugin
        reads (other than its default) is refused."""
        plugins = {self.attack, *self.defense_list}
        for key, value in self.options.items():
            known = declared()[key]
            known.option.validate(key, value)
            if strict and value != known.option.default and not plugins & set(known.plugins):
                raise ConfigError(f"{known.flag} does not apply to --attack {self.attack} --defense "
                                  f"{self.defense}; it is read by {', '.join(known.plugins)}")

    def validate_types(self) -> None:
        """Every core field holds a value of its type (a YAML or grid file may hold anything)."""
        hints = core_types()
        for name in CORE:
            value, kind = getattr(self, name), hints[name]
            ok = isinstance(value, kind) and (kind is bool or not isinstance(value, bool)) or (
                kind is float and isinstance(value, int) and not isinstance(value, bool))
            if not ok:
                raise ConfigError(f"--{name.replace('_', '-')} takes a {kind.__name__}, got {shown(value)}")

    def validate_data(self) -> None:
        """The checks on the fields that define the data and its partition."""
        self.validate_types()
        _positive(self, "clients", "batch_size", "image_size", "synthetic_classes", "synthetic_size",
                  "shards")
        _finite(self, "alpha")
        from fedsim.datasets import SOURCES

        _choice("dataset", self.dataset, tuple(SOURCES))
        _choice("partition", self.partition, PARTITIONS)
        if not self.alpha > 0:
            raise ConfigError(f"--alpha must be > 0, got {self.alpha}")
        _seed(self, "seed")
        if not IMAGE_SIZES[0] <= self.image_size <= IMAGE_SIZES[1]:  # the whole dataset is held at this size
            mib = f"{12 * self.image_size ** 2 / 2**20:,.1f} MiB" if self.image_size < 2**40 else "beyond any memory"
            raise ConfigError(f"--image-size must be in {IMAGE_SIZES[0]}..{IMAGE_SIZES[1]} pixels, got "
                              f"{self.image_size} (a 3 x {self.image_size}^2 float image takes {mib})")
        if self.synthetic_classes > SYNTHETIC_MAX_CLASSES:
            raise ConfigError(f"--synthetic-classes {self.synthetic_classes} is too many; valid: "
                              f"1..{SYNTHETIC_MAX_CLASSES}")
        if self.dataset == "imagefolder" and not self.data_root:
            raise ConfigError("--dataset imagefolder needs --data-root DIR, a folder with one "
                              "sub-folder of images per class")

    def validate_model(self) -> None:
        """The checks on the fields that describe the model (a replayed observation's too)."""
        self.validate_types()
        _positive(self, "n_ctx", "adapter_reduction", "lora_rank", "vpt_tokens")
        _finite(self, "adapter_ratio", "lora_alpha")
        _seed(self, "model_seed")
        if self.model in CLASSIC_MODELS:
            _choice("peft", self.peft, ("full",), f" for --model {self.model}")
            if self.pretrained not in ("none", "fedsim"):  # "fedsim" (the default) means nothing here
                raise ConfigError(f"--pretrained {self.pretrained!r} is not valid for --model {self.model}; "
                                  "valid: none (classic models start from random init)")
            return
        from fedsim.models.clip import clip_model_names

        if self.model not in ("tiny-clip", *clip_model_names()):
            raise ConfigError(f"--model {self.model!r} is not valid; valid: tiny-clip, "
                              f"{', '.join(CLASSIC_MODELS)}, or an open_clip model name such as "
                              f"{', '.join(clip_model_names()[:4])} (`fedsim models` lists them all)")
        _choice("peft", self.peft, CLIP_PEFT, f" for --model {self.model}")
        if self.pretrained == "fedsim" and self.model != "tiny-clip":
            raise ConfigError(f"--pretrained fedsim exists only for tiny-clip; for --model {self.model} "
                              "valid: none, an open_clip tag (`fedsim models`), or a checkpoint file")
        _choice("lora-tower", self.lora_tower, ("image", "text", "both"))
        if self.peft == "lora" and not self.lora_target_list:
            raise ConfigError(f"--lora-targets {self.lora_targets!r} names no module; valid: a comma-separated "
                              "list of attn, c_fc, c_proj")
        for target in self.lora_target_list:
            hint = " (peft wraps nn.MultiheadAttention whole: target attn)" if target == "out_proj" else ""
            _choice("lora-targets", target, ("attn", "c_fc", "c_proj"), hint)
        if not 0 <= self.adapter_ratio <= 1:
            raise ConfigError(f"--adapter-ratio must be in [0, 1], got {self.adapter_ratio}")

    @property
    def defense_list(self) -> list[str]:
        """The defense chain, in the order it applies (see fedsim.api.Chain); [] for none."""
        names = [n.strip() for n in self.defense.split(",")]
        return [] if names == ["none"] else names

    @property
    def lora_target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    def relevant_options(self) -> dict[str, Any]:
        """The options read by this run's attack and defenses (what config.yaml records)."""
        plugins = {self.attack, *self.defense_list}
        return {k: v for k, v in self.options.items() if plugins & set(declared()[k].plugins)}

    def to_dict(self) -> dict[str, Any]:
        """Core fields, then the options this run's plugins read, all flat (`dp_noise: 1.0`)."""
        return {**{name: getattr(self, name) for name in CORE}, **self.relevant_options()}

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except UnicodeDecodeError:
            raise ConfigError(f"{path} is not a text file (YAML, UTF-8)") from None
        except RecursionError:
            raise ConfigError(f"{path} is nested too deeply to be a run config") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path} is not valid YAML: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must be a mapping of option: value")
        return cls.from_dict(data)

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> "RunConfig":
        """From Flower's run config (`[tool.flwr.app.config]`, `flwr run --run-config`), whose
        keys are the `fedsim run` option names (batch-size = --batch-size). Numbers are cast to
        the option's type (TOML writes lr = 1 as an int)."""
        return cls.from_dict({key.replace("-", "_"): value for key, value in run_config.items()},
                             what="run-config key", spell=lambda k: k.replace("_", "-"))

    @classmethod
    def from_dict(cls, data: dict[str, Any], what: str = "config key", spell=lambda k: k) -> "RunConfig":
        types = option_types()
        unknown = sorted(set(data) - set(types))
        if unknown:
            raise ConfigError(f"unknown {what} {spell(unknown[0])!r}; valid: "
                              f"{', '.join(sorted(spell(k) for k in types))}")
        return cls(**{k: cast_number(types[k], v) for k, v in data.items()})


CORE = tuple(f.name for f in fields(RunConfig) if f.name != "options")


@lru_cache(maxsize=1)
def core_types() -> dict[str, type]:
    """Each core field's type (resolved once: a sweep validates thousands of configs)."""
    return get_type_hints(RunConfig)


def option_types() -> dict[str, type]:
    """Every key a RunConfig takes, core fields and installed plugins' options, with its type."""
    hints = core_types()
    return {**{name: hints[name] for name in CORE}, **{k: d.option.kind for k, d in declared().items()}}


def _choice(name: str, value: str, valid, where: str = "") -> None:
    if value not in valid:
        raise ConfigError(f"--{name.replace('_', '-')} {value!r} is not valid{where}; "
                          f"valid: {', '.join(valid)}")


IMAGE_SIZES = (8, 1024)  # pixels: below 8 the classic models' pooling has nothing left; above, memory
MAX_SEED = 2**63 - 1  # what torch.manual_seed and numpy's generators accept


def _seed(cfg: RunConfig, name: str) -> None:
    value = getattr(cfg, name)
    if not 0 <= value <= MAX_SEED:
        raise ConfigError(f"--{name.replace('_', '-')} must be in 0..2^63-1, got {value}")


def _positive(cfg: RunConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def check_writable_dir(out: Path, flag: str = "--out") -> None:
    """`out` is, or can be made, a directory this process may write into: checked before any
    work, so a bad path is an error that names it, never a traceback after the run."""
    try:
        _check_writable_dir(out, flag)
    except OSError as exc:  # a name too long for the file system, a loop of links, ...
        raise ConfigError(f"{flag} {shown(str(out))} cannot be used: {exc.strerror}") from None


def _check_writable_dir(out: Path, flag: str) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"{flag} {out} exists and is not a directory")
    existing = out
    while not existing.exists():  # the nearest ancestor that exists decides
        existing = existing.parent
    if not existing.is_dir():
        raise ConfigError(f"{flag} {out} lies under {existing}, which is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {out}: {existing} is not writable by this user")


def _finite(cfg: RunConfig, *names: str) -> None:
    for name in names:
        if not math.isfinite(getattr(cfg, name)):
            raise ConfigError(f"--{name.replace('_', '-')} must be a finite number, got {getattr(cfg, name)}")
