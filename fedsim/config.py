"""The run configuration: one dataclass, validated before any work starts, saved as YAML to rerun."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A bad value in a run configuration; the message names the value and the valid ones."""


DATASETS = ("digits", "faces", "photos", "synthetic", "mnist", "cifar10", "cifar100", "caltech101",
            "imagefolder")
PARTITIONS = ("iid", "dirichlet", "shard")
SYNTHETIC_MAX_CLASSES = 64  # 8 shapes x 8 colours
CLASSIC_MODELS = ("lenet", "convnet", "resnet18")
CLIP_PEFT = ("coop", "adapter", "text-adapter", "double-adapter", "lora", "vpt", "linear-probe", "full")
DEVICES = ("auto", "cpu", "cuda")
PROTOCOLS = ("fedsgd", "fedavg")
LABEL_STRATEGIES = ("idlg", "gradinversion", "llg", "ilrg")
MIP_PRIORS = ("ridge", "conv", "tv")  # attacks.decoders.LEARNED_PRIORS + tv; config imports no attack code
ENGINES = ("ray", "inprocess")


def option(default, help: str):
    """A config field that is also a `fedsim run` option; `help` is its --help text."""
    return field(default=default, metadata={"help": help})


@dataclass
class RunConfig:
    """Everything that defines a run; every field is also a `fedsim run` option."""

    clients: int = option(10, "number of simulated clients (Flower supernodes)")
    rounds: int = option(1, "federated rounds")
    batch_size: int = option(1, "images in each client's batch per round (FedSGD: one batch, one gradient)")
    dataset: str = option("digits", "embedded: digits, faces, photos, synthetic; from --data-root: "
                                    "mnist, cifar10, cifar100, caltech101, imagefolder")
    image_size: int = option(32, "images are resized to this many pixels per side")
    data_root: str = option("", "folder holding mnist/cifar/caltech101 files in torchvision's layout, "
                                "or imagefolder's class folders; empty = ~/.cache/fedsim/data")
    download: bool = option(False, "let torchvision download mnist/cifar/caltech101 into --data-root "
                                   "(needs network)")
    synthetic_classes: int = option(10, "synthetic: number of shape classes (up to 8 shapes, "
                                        "then shape-and-colour pairs, at most 64)")
    synthetic_size: int = option(100, "synthetic: images per class")
    partition: str = option("iid", "how the private pool is split across clients: iid, dirichlet "
                                    "(label skew, see --alpha) or shard (see --shards)")
    alpha: float = option(0.5, "dirichlet: concentration; smaller = each client sees fewer classes")
    shards: int = option(2, "shard: classes per client")
    model: str = option("tiny-clip", "tiny-clip (shipped with fedsim), any open_clip model name "
                        "(e.g. ViT-B-32), or a classic model: lenet (DLG's), convnet, resnet18")
    pretrained: str = option("fedsim", "CLIP weights: fedsim = tiny-clip pre-trained by fedsim (built "
                             "and cached on first use), none = random init, an open_clip pretrained "
                             "tag (downloaded when online), or a local checkpoint file")
    peft: str = option("coop", "trainable part of CLIP: " + ", ".join(CLIP_PEFT) + "; classic models: full")
    n_ctx: int = option(4, "coop: number of learnable context vectors")
    coop_class_specific: bool = option(False, "coop: one set of context vectors per class")
    adapter_reduction: int = option(4, "adapters: bottleneck width = feature width / reduction")
    adapter_ratio: float = option(0.2, "adapters: residual blend ratio alpha (output = alpha*A(f) + (1-alpha)*f)")
    lora_rank: int = option(4, "lora: rank r")
    lora_alpha: float = option(8.0, "lora: scaling alpha")
    lora_tower: str = option("image", "lora: image, text or both towers")
    lora_targets: str = option("attn", "lora: comma-separated block parts: attn (whole attention), c_fc, c_proj")
    vpt_tokens: int = option(4, "vpt: number of learnable visual prompt tokens")
    protocol: str = option("fedsgd", "fedsgd: clients send the gradient of one batch; fedavg: clients "
                           "take local SGD steps and send the weight delta")
    lr: float = option(0.01, "learning rate: the server's step on the averaged gradient (fedsgd), "
                       "the clients' SGD step (fedavg)")
    local_steps: int = option(1, "fedavg: SGD steps on the round's batch")
    local_epochs: int = option(0, "fedavg: if > 0, passes over all the client's data instead of local steps")
    fraction: float = option(1.0, "share of clients sampled each round")
    attack: str = option("mip", "attack run by the curious server on every client update; none to skip")
    attack_iters: int = option(10, "optimiser iterations of the attack (DLG: L-BFGS steps of up to 20 "
                               "iterations each; MIP: refinement steps of the image-encoder inversion)")
    mip_prior: str = option("ridge", "mip: image prior: ridge (kernel ridge) or conv (decoders learned on the "
                            "public split, cached) or tv (total variation from the public mean image)")
    label_strategy: str = option("default", "how the attack gets labels: default (the attack's own), "
                                 "optimise (soft labels, DLG-style), or a rule: " + ", ".join(LABEL_STRATEGIES))
    attack_restarts: int = option(1, "independent restarts; the one that matches the gradient best is kept")
    defense: str = option("none", "comma-separated chain of defenses, applied in the order given "
                          "(`fedsim list` shows them): dp, dp-update, flower-dp, prune, quantize, soteria, "
                          "secagg; none for no defense")
    dp_clip: float = option(1.0, "dp: per-example gradient L2 clipping bound C")
    dp_noise: float = option(1.0, "dp: noise multiplier sigma (noise std = sigma * C on the summed gradient)")
    dp_delta: float = option(1e-5, "dp, dp-update, flower-dp: delta at which epsilon is reported")
    update_clip: float = option(1.0, "dp-update, flower-dp: L2 clipping bound C of a client's whole update")
    update_noise: float = option(1.0, "dp-update, flower-dp: noise multiplier sigma (std sigma * C on the "
                                 "update; flower-dp: on the sum, added by the server)")
    prune_ratio: float = option(0.9, "prune: share of each tensor's entries, smallest in magnitude, set to zero")
    quantize_bits: int = option(8, "quantize: bits per entry (2^bits levels between a tensor's min and max)")
    quantize_mode: str = option("stochastic", "quantize: stochastic (unbiased rounding) or deterministic (nearest)")
    soteria_ratio: float = option(0.8, "soteria: share of representation units masked in the gradient of the "
                                  "layer they feed")
    secagg_shares: int = option(3, "secagg: SecAgg+ neighbours each client secret-shares its keys with "
                                "(>= 3; 1 = every sampled client, as in the original SecAgg)")
    secagg_threshold: int = option(2, "secagg: shares needed to rebuild a client's secret (2 <= threshold < "
                                   "shares; 1 = all of them)")
    secagg_clip: float = option(8.0, "secagg: SecAgg+ clips each update entry to [-clip, clip] before "
                                "quantising it to 2^22 levels")
    seed: int = option(0, "seeds data split, batch schedule, model init, noise and attack")
    engine: str = option("ray", "ray: Flower's simulation engine on Ray; inprocess: clients called "
                         "one after another in this process (no Ray start-up; tests, debugging)")
    device: str = option("auto", "auto = CUDA when available, else CPU")
    out: str = option("", "output directory; empty = runs/<timestamp>")
    overwrite: bool = option(False, "allow writing into a non-empty output directory")

    def validate(self, attacks: list[str], defenses: list[str]) -> None:
        """Fail fast with a message naming the bad value and the valid ones."""
        self.validate_data()
        _positive(self, "rounds", "n_ctx", "attack_iters", "attack_restarts", "adapter_reduction",
                  "lora_rank", "vpt_tokens", "local_steps")
        _choice("protocol", self.protocol, PROTOCOLS)
        if self.local_epochs < 0:
            raise ConfigError(f"--local-epochs must be >= 0, got {self.local_epochs}")
        if not 0 < self.fraction <= 1:
            raise ConfigError(f"--fraction must be in (0, 1], got {self.fraction}")
        self._validate_model()
        _choice("attack", self.attack, ["none", *attacks])
        _choice("label-strategy", self.label_strategy, ("default", "optimise", *LABEL_STRATEGIES))
        _choice("mip-prior", self.mip_prior, MIP_PRIORS)
        self._validate_defenses(defenses)
        _choice("device", self.device, DEVICES)
        _choice("engine", self.engine, ENGINES)
        if self.lr <= 0:
            raise ConfigError(f"--lr must be > 0, got {self.lr}")
        if self.out:
            out = Path(self.out)
            if out.exists() and not out.is_dir():
                raise ConfigError(f"--out {self.out} exists and is not a directory")
            if out.is_dir() and any(out.iterdir()) and not self.overwrite:
                raise ConfigError(f"--out {self.out} exists and is not empty; pass --overwrite or "
                                  "choose another directory")

    def validate_data(self) -> None:
        """The checks on the fields that define the data and its partition."""
        _positive(self, "clients", "batch_size", "image_size", "synthetic_classes", "synthetic_size",
                  "shards")
        _choice("dataset", self.dataset, DATASETS)
        _choice("partition", self.partition, PARTITIONS)
        if not self.alpha > 0:
            raise ConfigError(f"--alpha must be > 0, got {self.alpha}")
        if self.synthetic_classes > SYNTHETIC_MAX_CLASSES:
            raise ConfigError(f"--synthetic-classes {self.synthetic_classes} is too many; valid: "
                              f"1..{SYNTHETIC_MAX_CLASSES}")
        if self.dataset == "imagefolder" and not self.data_root:
            raise ConfigError("--dataset imagefolder needs --data-root DIR, a folder with one "
                              "sub-folder of images per class")

    def _validate_model(self) -> None:
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
        for target in self.lora_target_list:
            hint = " (peft wraps nn.MultiheadAttention whole: target attn)" if target == "out_proj" else ""
            _choice("lora-targets", target, ("attn", "c_fc", "c_proj"), hint)
        if not 0 <= self.adapter_ratio <= 1:
            raise ConfigError(f"--adapter-ratio must be in [0, 1], got {self.adapter_ratio}")

    def _validate_defenses(self, installed: list[str]) -> None:
        chain = [n.strip() for n in self.defense.split(",")]
        for name in chain:
            _choice("defense", name, ["none", *installed], " (a comma-separated chain)")
        if "none" in chain and len(chain) > 1:
            raise ConfigError(f"--defense {self.defense!r}: none cannot be chained with other defenses")
        repeated = sorted({n for n in chain if chain.count(n) > 1})
        if repeated:
            raise ConfigError(f"--defense {self.defense!r} names {', '.join(repeated)} more than once")
        for name in ("dp_noise", "update_noise"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        for name in ("dp_clip", "update_clip"):
            if getattr(self, name) <= 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be > 0, got {getattr(self, name)}")
        if not 0 < self.dp_delta < 1:
            raise ConfigError(f"--dp-delta must be in (0, 1), got {self.dp_delta}")
        for name in ("prune_ratio", "soteria_ratio"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be in [0, 1), got {getattr(self, name)}")
        if "secagg" in chain:
            self._validate_secagg(chain)
        if not 1 <= self.quantize_bits <= 16:
            raise ConfigError(f"--quantize-bits must be in 1..16, got {self.quantize_bits}")
        _choice("quantize-mode", self.quantize_mode, ("stochastic", "deterministic"))

    def _validate_secagg(self, chain: list[str]) -> None:
        """SecAgg+'s own constraints (Flower's SecAggPlusWorkflow), checked before any work."""
        if "flower-dp" in chain:
            raise ConfigError("--defense secagg cannot be chained with flower-dp: Flower's SecAgg+ runs on its "
                              "legacy strategy API, its fixed-clipping DP wrapper here on the Message API")
        sampled = max(1, int(self.clients * self.fraction))
        if sampled < 2:
            raise ConfigError(f"--defense secagg needs at least 2 clients per round (--clients x --fraction), "
                              f"got {sampled}")
        if not (self.secagg_shares == 1 or self.secagg_shares >= 3):
            raise ConfigError(f"--secagg-shares must be 1 (every sampled client) or >= 3, got {self.secagg_shares}")
        neighbours = sampled if self.secagg_shares == 1 else min(self.secagg_shares, sampled)
        if not (self.secagg_threshold == 1 or 2 <= self.secagg_threshold <= neighbours) or (
                self.secagg_shares >= 3 and self.secagg_threshold >= self.secagg_shares):
            raise ConfigError(f"--secagg-threshold must be 1 (all shares) or in 2..{neighbours} and below "
                              f"--secagg-shares {self.secagg_shares}, got {self.secagg_threshold}")
        if not self.secagg_clip > 0:
            raise ConfigError(f"--secagg-clip must be > 0, got {self.secagg_clip}")

    @property
    def defense_list(self) -> list[str]:
        """The defense chain, in the order it applies (see defenses.base.Chain); [] for none."""
        names = [n.strip() for n in self.defense.split(",")]
        return [] if names == ["none"] else names

    @property
    def lora_target_list(self) -> tuple[str, ...]:
        return tuple(t.strip() for t in self.lora_targets.split(",") if t.strip())

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: Path) -> None:
        path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))

    @classmethod
    def load(cls, path: Path) -> "RunConfig":
        data = yaml.safe_load(Path(path).read_text()) or {}
        return cls.from_dict(data)

    @classmethod
    def from_run_config(cls, run_config: dict[str, Any]) -> "RunConfig":
        """From Flower's run config (`[tool.flwr.app.config]`, `flwr run --run-config`), whose
        keys are the `fedsim run` option names (batch-size = --batch-size). Numbers are cast to
        the field's type (TOML writes lr = 1 as an int)."""
        types = {f.name: type(f.default) for f in fields(cls)}
        data = {}
        for key, value in run_config.items():
            name = key.replace("-", "_")
            if name not in types:
                raise ConfigError(f"unknown run-config key {key!r}; valid: "
                                  f"{', '.join(sorted(n.replace('_', '-') for n in types))}")
            data[name] = types[name](value) if types[name] in (int, float) else value
        return cls(**data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RunConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown config keys {unknown}; valid: {sorted(known)}")
        return cls(**data)


def _choice(name: str, value: str, valid, where: str = "") -> None:
    if value not in valid:
        raise ConfigError(f"--{name.replace('_', '-')} {value!r} is not valid{where}; "
                          f"valid: {', '.join(valid)}")


def _positive(cfg: RunConfig, *names: str) -> None:
    for name in names:
        value = getattr(cfg, name)
        if value < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {value}")
