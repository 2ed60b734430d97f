"""The grid file of `fedsim sweep`: which runs a sweep holds, each checked before any runs.

A grid file names RunConfig fields and their values:

    base:   {clients: 3, attack_iters: 20}        # fixed for every trial
    grid:   {attack: [dlg, ig], seed: [0, 1, 2]}  # Cartesian product
    trials: [{peft: coop}, {peft: adapter, adapter_ratio: 0.5}]   # explicit list, crossed with the grid
    report: {rows: [attack], columns: [peft], values: [psnr]}     # optional pivot layout

Each trial is a resolved RunConfig with an id: a hash of its config without where it writes and
its time limits (`trial_id`), so the same trial in a later sweep has the same id and a rerun
skips it (`fedsim.sweep`).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from fedsim.config import ConfigError, RunConfig, option_types
from fedsim.options import declared, shown

GRID_KEYS = ("base", "grid", "trials", "report")
SWEEP_OWNED = ("out", "overwrite", "resume", "engine")  # set by the sweep for every trial
# where a trial writes, and how long its attacks and clients may take, do not change what a
# finished attack computes
NOT_HASHED = ("out", "overwrite", "resume", "attack_timeout", "client_timeout")
MAX_TRIALS = 10_000  # a grid is counted before it is expanded; a larger one is refused with its count
METRICS = ("psnr", "ssim", "label_acc", "lpips", "accuracy_final", "trial_seconds")


@dataclass
class Trial:
    id: str
    config: RunConfig  # resolved: defaults, then base, then the list entry, then the grid point


@dataclass
class Grid:
    trials: list[Trial]
    swept: list[str]  # fields whose value differs between trials, in grid-file order
    report: dict[str, list[str]]


def load_grid(path: Path) -> Grid:
    """Parse and check a grid file; every trial's config is validated before any trial runs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"grid file {path} does not exist")
    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ConfigError(f"grid file {path} is not a text file (YAML, UTF-8)") from None
    except RecursionError:
        raise ConfigError(f"grid file {path} is nested too deeply to be a grid") from None
    except yaml.YAMLError as exc:
        raise ConfigError(f"grid file {path} is not valid YAML: {exc}") from None
    if not isinstance(spec, dict):
        raise ConfigError(f"grid file {path} must be a mapping with keys {', '.join(GRID_KEYS)}")
    return parse_grid(spec, source=str(path))


def parse_grid(spec: dict, source: str = "grid") -> Grid:
    unknown = sorted(set(spec) - set(GRID_KEYS))
    if unknown:
        raise ConfigError(f"{source}: unknown top-level keys {unknown}; valid: {', '.join(GRID_KEYS)}")
    base = _fields(spec.get("base") or {}, f"{source}: base")
    grid = spec.get("grid") or {}
    if not isinstance(grid, dict):
        raise ConfigError(f"{source}: grid must map field names to lists of values, got {shown(grid)}")
    for name, values in grid.items():
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{source}: grid.{name} must be a non-empty list of values, got {shown(values)}")
        for value in values:
            _fields({name: value}, f"{source}: grid.{name}")
    entries = spec.get("trials") or []
    if not isinstance(entries, list):
        raise ConfigError(f"{source}: trials must be a list of mappings, got {shown(entries)}")
    entries = [_fields(entry, f"{source}: trials[{i}]") for i, entry in enumerate(entries)]
    if not grid and not entries:
        raise ConfigError(f"{source}: the grid is empty; give `grid:` (field: [values, ...]) and/or "
                          "`trials:` (a list of field: value mappings)")
    count = max(len(entries), 1) * math.prod(len(values) for values in grid.values())
    if count > MAX_TRIALS:
        raise ConfigError(f"{source}: the grid holds {count:,} trials, more than a sweep takes ({MAX_TRIALS:,}); "
                          "split it into several grid files (each its own --out), or sweep fewer values")

    trials, seen = [], {}
    points = [dict(zip(grid, combo)) for combo in itertools.product(*grid.values())]
    for entry in entries or [{}]:
        for point in points:
            cfg = RunConfig(**{**base, **entry, **point, "engine": "inprocess"})
            where = f"{source}: trial {_describe(entry, point)}"
            try:
                cfg.validate(strict_options=False)  # the base's options need not apply to every trial
            except ConfigError as exc:
                raise ConfigError(f"{where}: {exc}") from None
            tid = trial_id(cfg)
            if tid in seen:
                if seen[tid][1] != cfg:  # differs only in options its plugins do not read (dp_noise
                    continue             # under defense none, in a grid crossing both): one run
                raise ConfigError(f"{where} is the same run as trial {seen[tid][0]}; remove the duplicate")
            seen[tid] = (_describe(entry, point), cfg)
            trials.append(Trial(tid, cfg))
    swept = [name for name in dict.fromkeys([*(k for e in entries for k in e), *grid])
             if len({repr(t.config.value(name)) for t in trials}) > 1]
    return Grid(trials, swept, _report_spec(spec.get("report") or {}, swept, source))


def _fields(values: Any, where: str) -> dict[str, Any]:
    """Check names against RunConfig's fields and values against their types."""
    if not isinstance(values, dict):
        raise ConfigError(f"{where} must be a mapping of field: value, got {shown(values)}")
    types = option_types()
    valid = [name for name in types if name not in SWEEP_OWNED]
    for name, value in values.items():
        if name in SWEEP_OWNED:
            raise ConfigError(f"{where}: {shown(name)} is set by the sweep (trials run in OUT/trials/<id> with "
                              "the in-process engine); remove it")
        if name not in types:
            raise ConfigError(f"{where}: unknown field {shown(name)}; valid: {', '.join(valid)}")
        want = types[name]
        if value is None and name in declared() and declared()[name].option.default is None:
            continue  # an unset plugin option (the attack's own default)
        ok = (isinstance(value, bool) if want is bool else
              isinstance(value, int) and not isinstance(value, bool) if want is int else
              isinstance(value, (int, float)) and not isinstance(value, bool) if want is float else
              isinstance(value, want))
        if not ok:
            raise ConfigError(f"{where}: {name} = {shown(value)} is a {type(value).__name__}; "
                              f"{name} takes a {want.__name__}")
    return {k: float(v) if types[k] is float else v for k, v in values.items()}


def _describe(*parts: dict) -> str:
    merged = {k: v for part in parts for k, v in part.items()}
    return "{" + ", ".join(f"{k}: {v}" for k, v in merged.items()) + "}"


def _report_spec(report: Any, swept: list[str], source: str) -> dict[str, list[str]]:
    if not isinstance(report, dict) or set(report) - {"rows", "columns", "values"}:
        raise ConfigError(f"{source}: report takes rows, columns and values (lists of names), got {shown(report)}")
    spec = {k: [v] if isinstance(v, str) else list(v) for k, v in report.items()}
    axes = [s for s in swept if s != "seed"]  # seeds are what the median is taken over
    spec.setdefault("rows", axes[:1] or ["attack"])
    spec.setdefault("columns", [a for a in axes if a not in spec["rows"]][:1])
    spec.setdefault("values", ["psnr", "label_acc"])
    names = set(option_types())
    for name in spec["rows"] + spec["columns"]:
        if name not in names:
            raise ConfigError(f"{source}: report axis {shown(name)} is not a config field; "
                              f"valid: {', '.join(sorted(names))}")
    for name in spec["values"]:
        if name not in METRICS:
            raise ConfigError(f"{source}: report value {shown(name)} is not valid; valid: {', '.join(METRICS)}")
    return spec


def identity(cfg: RunConfig) -> dict[str, Any]:
    """What a trial is known by, in its id and in the results table's columns: its resolved
    config without where it writes and its time limits."""
    return {k: v for k, v in cfg.to_dict().items() if k not in NOT_HASHED}


def trial_id(cfg: RunConfig) -> str:
    """A hash of the resolved config: the same trial in a later sweep has the same id."""
    return hashlib.sha256(json.dumps(identity(cfg), sort_keys=True).encode()).hexdigest()[:12]
