"""Attack and defense plugins, found through entry points (built-ins register the same way)."""

from __future__ import annotations

from importlib.metadata import EntryPoint, entry_points

ATTACK_GROUP = "fedsim.attacks"
DEFENSE_GROUP = "fedsim.defenses"


def available(group: str) -> dict[str, EntryPoint]:
    return {ep.name: ep for ep in entry_points(group=group)}


def attack_names() -> list[str]:
    return sorted(available(ATTACK_GROUP))


def defense_names() -> list[str]:
    return sorted(available(DEFENSE_GROUP))


def _load(group: str, name: str):
    plugins = available(group)
    if name not in plugins:
        raise KeyError(f"no plugin {name!r} in {group}; installed: {', '.join(sorted(plugins)) or 'none'}")
    return plugins[name].load()


def make_attack(cfg, progress=None):
    """The attack named by the config, or None for `--attack none`."""
    if cfg.attack == "none":
        return None
    return _load(ATTACK_GROUP, cfg.attack).from_config(cfg, progress=progress)


def make_defense(cfg):
    """The config's defense chain (`--defense dp,prune`), applied in the order described in
    `defenses.base.Chain`; `none` gives an empty chain, which changes nothing."""
    from defenses.base import Chain

    return Chain([_load(DEFENSE_GROUP, name).from_config(cfg) for name in cfg.defense_list])
