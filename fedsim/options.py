"""Plugin options: each attack and defense declares its own, and everything else derives from them.

A plugin lists `Option`s in its class attribute `options`. An option's key in a run config is
`<plugin>_<name>` (`dp_noise`, `mip_prior`; on the command line `--dp-noise`), unless it names a
`key` of its own, which several plugins may share (`update_clip` for dp-update and flower-dp,
`attack_iters` for every attack). `fedsim run --help`, `fedsim list`, sweep grids, config.yaml
and the `flwr run` config (`fedsim flwr-config`) all read these declarations, so a third-party
plugin's options work everywhere its name does.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any


class ConfigError(ValueError):
    """A bad value in a run configuration; the message names the value and the valid ones."""


@dataclass(frozen=True)
class Option:
    """One option of a plugin. `check(value)` is True for a valid value and `valid` says, in
    words, which values are (shown in errors and --help). Float options reject NaN and infinity."""

    name: str  # the plugin's constructor keyword
    default: Any
    help: str
    type: type | None = None  # None: the default's type (give it when the default is None)
    choices: tuple = ()
    check: Callable[[Any], bool] | None = None
    valid: str = ""
    key: str = ""  # the run-config key; empty: <plugin>_<name>

    @property
    def kind(self) -> type:
        return self.type or type(self.default)

    def key_for(self, plugin: str) -> str:
        return self.key or f"{plugin}_{self.name}".replace("-", "_")

    def validate(self, key: str, value: Any) -> None:
        flag = "--" + key.replace("_", "-")
        if value is None and self.default is None:
            return
        if self.kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{flag} must be a finite number, got {value}")
        elif not isinstance(value, self.kind) or (self.kind is int and isinstance(value, bool)):
            raise ConfigError(f"{flag} takes a {self.kind.__name__}, got {shown(value)}")
        elif self.kind is int and not -2**63 <= value < 2**63:
            raise ConfigError(f"{flag} {shown(value)} is out of range: integers here fit in 64 bits")
        if self.choices and value not in self.choices:
            raise ConfigError(f"{flag} {value!r} is not valid; valid: {', '.join(map(str, self.choices))}")
        if self.check is not None and not self.check(value):
            raise ConfigError(f"{flag} must be {self.valid}, got {value}")

    def cast(self, value: Any) -> Any:
        """A value from TOML or YAML as this option's type (see `cast_number`); "" is unset."""
        if value == "" and self.default is None:  # TOML has no null: an unset option is written ""
            return None
        return cast_number(self.kind, value)


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother, _SHORT.maxlong = 2, 80, 80, 40
_SHORT.maxdict = _SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxset = 6


def shown(value: Any) -> str:
    """A value quoted in an error message, cut short: a file may hold a huge or deeply nested
    value (a YAML alias bomb expands to millions of items) that must not become the message."""
    return _SHORT.repr(value)


def cast_number(kind: type, value: Any) -> Any:
    """A number read from TOML or YAML as `kind`: 1 for a float option is 1.0 (TOML writes 1.0
    as 1), 3.0 for an int option is 3; anything else (2.7 for an int) is left for validation to
    refuse, never truncated."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return value
    if kind is float:
        return float(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def at_least(low: float) -> dict:
    return {"check": lambda v: v >= low, "valid": f">= {low:g}"}


def between(low: int, high: int) -> dict:
    return {"check": lambda v: low <= v <= high, "valid": f"in {low:,}..{high:,}"}


def above(low: float) -> dict:
    return {"check": lambda v: v > low, "valid": f"> {low:g}"}


def within(low: float, high: float, *, closed_high: bool = False, open_low: bool = False) -> dict:
    lo, hi = ("(" if open_low else "["), ("]" if closed_high else ")")
    return {"check": lambda v: (v > low if open_low else v >= low) and (v <= high if closed_high else v < high),
            "valid": f"in {lo}{low:g}, {high:g}{hi}"}


@dataclass
class Declared:
    """An option key and every installed plugin that reads it."""

    key: str
    option: Option
    group: str  # "attack" or "defense"
    plugins: list[str] = field(default_factory=list)

    @property
    def flag(self) -> str:
        return "--" + self.key.replace("_", "-")


@lru_cache(maxsize=1)
def declared() -> dict[str, Declared]:
    """Every installed plugin's options by key, in the order the plugins declare them. Two
    plugins that share a key must agree on its type and default."""
    from fedsim.plugins import ATTACK_GROUP, DEFENSE_GROUP, available

    out: dict[str, Declared] = {}
    for group, entry_group in (("attack", ATTACK_GROUP), ("defense", DEFENSE_GROUP)):
        for name, ep in sorted(available(entry_group).items()):
            for opt in getattr(ep.load(), "options", ()):
                key = opt.key_for(name)
                seen = out.setdefault(key, Declared(key, opt, group))
                if (seen.option.kind, seen.option.default) != (opt.kind, opt.default):
                    raise ConfigError(f"plugin {name} declares option {key} as {opt.kind.__name__} = "
                                      f"{opt.default!r}; {', '.join(seen.plugins)} as "
                                      f"{seen.option.kind.__name__} = {seen.option.default!r}")
                seen.plugins.append(name)
    return out


def plugin_keys(plugin_class, name: str) -> dict[str, Option]:
    """A plugin's options by run-config key."""
    return {opt.key_for(name): opt for opt in getattr(plugin_class, "options", ())}
