"""Attack and defense plugins, found through entry points (built-ins register the same way)."""

from __future__ import annotations

from functools import lru_cache
from importlib.metadata import EntryPoint, entry_points

from fedsim.options import ConfigError

ATTACK_GROUP = "fedsim.attacks"
DEFENSE_GROUP = "fedsim.defenses"


@lru_cache(maxsize=None)
def available(group: str) -> dict[str, EntryPoint]:
    """The installed plugins of a group, read once per process (reading the installed
    distributions' metadata takes milliseconds, and a sweep validates thousands of trials)."""
    return {ep.name: ep for ep in entry_points(group=group)}


def attack_names() -> list[str]:
    return sorted(available(ATTACK_GROUP))


def defense_names() -> list[str]:
    return sorted(available(DEFENSE_GROUP))


def plugin_class(group: str, name: str):
    plugins = available(group)
    if name not in plugins:
        kind = "attack" if group == ATTACK_GROUP else "defense"
        raise ConfigError(f"--{kind} {name!r} is not installed; valid: {', '.join(sorted(plugins)) or 'none'}")
    return plugins[name].load()


def make_attack(cfg, knowledge, progress=None):
    """The attack named by the config, built from the server's knowledge and the attack's own
    options (nothing else of the config reaches it); None for `--attack none`."""
    if cfg.attack == "none":
        return None
    cls = plugin_class(ATTACK_GROUP, cfg.attack)
    return cls.from_knowledge(knowledge, cfg.plugin_options(cls, cfg.attack), progress=progress)


def make_defense(cfg):
    """The config's defense chain (`--defense dp,prune`), applied in the order described in
    `fedsim.api.Chain`; `none` gives an empty chain, which changes nothing."""
    from fedsim.api import Chain
    from fedsim.protocol import Protocol

    protocol = Protocol.of(cfg)
    defenses = []
    for name in cfg.defense_list:
        cls = plugin_class(DEFENSE_GROUP, name)
        try:
            defenses.append(cls.from_options(cfg.plugin_options(cls, name), protocol))
        except ValueError as exc:  # a defense refusing its options: a user's error, not a bug
            raise ConfigError(str(exc)) from None
    for defense in defenses:
        defense.check_chain(cfg.defense_list, protocol)
    return Chain(defenses)
