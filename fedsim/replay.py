"""`fedsim attack FILE`: run an attack on a saved Observation, offline."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
from rich.console import Console

from fedsim.config import IMAGE_SIZES, ConfigError, RunConfig
from fedsim.knowledge import AttackerKnowledge
from fedsim.models import build_task
from fedsim.observation import Observation
from fedsim.options import declared, shown
from fedsim.plugins import attack_names, make_attack
from fedsim.protocol import Protocol
from fedsim.report import save_grid


def replay_knowledge(obs: Observation, saved: RunConfig | None, dataset: str | None) -> AttackerKnowledge:
    """The knowledge the run's server had: from the run's config.yaml when the observation sits in
    a run folder, else from the observation's model description over `dataset`'s public split
    (default digits). The model and the protocol are the observation's own, as the server saw them."""
    cfg = saved or RunConfig(image_size=obs.model_spec["image_size"])
    if dataset:
        cfg = dataclasses.replace(cfg, dataset=dataset)
    knowledge = AttackerKnowledge.of(cfg)
    if list(knowledge.class_names) != list(obs.model_spec["class_names"]):
        raise ConfigError(f"the public split of --dataset {cfg.dataset} has classes "
                          f"{list(knowledge.class_names)[:5]}..., "
                          f"the observation's model {list(obs.model_spec['class_names'])[:5]}...; pass the run's "
                          "dataset with --dataset")
    protocol = Protocol(name="fedsgd" if obs.kind == "gradient" else "fedavg", lr=obs.lr, batch_size=obs.batch_size,
                        local_steps=obs.local_steps, clients=knowledge.protocol.clients,
                        fraction=knowledge.protocol.fraction, rounds=knowledge.protocol.rounds)
    return dataclasses.replace(knowledge, model_spec=obs.model_spec,
                               protocol=knowledge.protocol if saved is not None else protocol)


SAFE_PRETRAINED = ("fedsim", "none")  # what a replayed file may ask the loader for by itself


def trusted_spec(obs: Observation, pretrained: str | None) -> dict:
    """The observation's model description, checked against the keys fedsim writes, with the
    checkpoint chosen by the user: a file's own `pretrained` is followed only when it names no
    file (fedsim's tiny CLIP, none, an open_clip tag); a path inside an untrusted file is not."""
    from fedsim.models import model_spec

    spec = dict(obs.model_spec)
    allowed = set(model_spec(RunConfig(), ()))
    unknown, missing = sorted(map(str, set(spec) - allowed)), sorted(allowed - set(spec))
    if unknown or missing:
        raise ConfigError("the observation's model description " + (
            f"has unknown keys {', '.join(unknown)}; valid: {', '.join(sorted(allowed))}" if unknown
            else f"lacks {', '.join(missing)}"))
    names = spec["class_names"]
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"the observation's class names {names!r} are not a list of names")
    described = RunConfig(**{k: v for k, v in spec.items() if k not in ("class_names", "pretrained")})
    described.validate_model()
    if not IMAGE_SIZES[0] <= described.image_size <= IMAGE_SIZES[1]:
        raise ConfigError(f"the observation's image size {described.image_size} is outside "
                          f"{IMAGE_SIZES[0]}..{IMAGE_SIZES[1]}")
    if pretrained is not None:
        spec["pretrained"] = pretrained
    elif not isinstance(spec["pretrained"], str) or not (spec["pretrained"] in SAFE_PRETRAINED or
                                                         _is_tag(spec["model"], spec["pretrained"])):
        raise ConfigError(f"the observation asks to load the checkpoint {spec['pretrained']!r}; a replayed file "
                          "does not choose what is loaded: pass the checkpoint with --pretrained PATH")
    return spec


def _is_tag(model: str, tag: str) -> bool:
    import open_clip

    return isinstance(model, str) and tag in open_clip.list_pretrained_tags_by_model(model)


def check_shapes(obs: Observation, task) -> None:
    """The update's tensors against the trainable parameters of the model it describes."""
    trainable = task.trainable()
    wrong = [f"{n} {list(t.shape)} (the model's: {list(trainable[n].shape) if n in trainable else 'none'})"
             for n, t in obs.update.items() if n not in trainable or trainable[n].shape != t.shape]
    if wrong:
        raise ConfigError("the observation's update does not fit the model it describes: " + "; ".join(wrong[:5]))


def replay(path: Path, attack: str, iterations: int | None, attack_seed: int | None, out: Path,
           console: Console, dataset: str | None = None, pretrained: str | None = None) -> None:
    """`iterations` and `attack_seed` left None keep the saved run's (or the attack's defaults);
    `pretrained` (--pretrained) is the checkpoint to build the model from, where the file names one."""
    if attack not in attack_names():
        raise ConfigError(f"--attack {attack!r} is not installed; valid: {', '.join(attack_names())}")
    if iterations is not None:
        declared()["attack_iters"].option.validate("attack_iters", iterations)
    try:
        usable = not (out.exists() and out.is_dir()) and out.parent.is_dir()
    except OSError as exc:  # a name too long for the file system, ...
        raise ConfigError(f"--out {shown(str(out))} cannot be used: {exc.strerror}") from None
    if not usable:
        raise ConfigError(f"--out {out} must be a file in an existing directory")
    obs = Observation.load(path)
    obs.model_spec = trusted_spec(obs, pretrained)
    saved_path = Path(path).resolve().parent.parent / "config.yaml"
    saved = RunConfig.load(saved_path) if saved_path.exists() else None
    knowledge = replay_knowledge(obs, saved, dataset)
    if attack_seed is not None:
        knowledge = dataclasses.replace(knowledge, attack_seed=attack_seed)
    # The saved run's options for this attack, if it ran this one; otherwise the attack's defaults.
    options = saved.relevant_options() if saved is not None and saved.attack == attack else {}
    if iterations is not None:
        options["attack_iters"] = iterations
    cfg = RunConfig(attack=attack, defense=saved.defense if saved is not None and saved.attack == attack else "none",
                    **options)
    cfg.validate_options()
    task = build_task(obs.model_spec, "cuda" if torch.cuda.is_available() else "cpu")
    check_shapes(obs, task)
    recon = make_attack(cfg, knowledge).reconstruct(obs, task)
    save_grid(out, [(recon.images, recon.labels)], obs.model_spec["class_names"])
    console.print(f"round {obs.round}, client {obs.client}: labels {recon.labels.tolist()}, "
                  f"gradient loss {recon.extras.get('gradient_loss', float('nan')):.3g}; saved {out}")
