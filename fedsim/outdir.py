"""A run's output directory: who may write into it (a lock), where a replacing run writes
until it is complete (--overwrite), and the saved config a --resume continues."""

from __future__ import annotations

import os
import shutil
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

from fedsim.config import CORE, ConfigError, RunConfig

LOCK = ".fedsim.lock"


@contextmanager
def output_lock(out: Path):
    """Hold OUT/.fedsim.lock (the holder's pid) for the run: a second run into the same --out is
    refused while the first is alive; a lock left by a process that died is taken over."""
    path = out / LOCK
    while True:
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            break
        except FileExistsError:
            try:
                holder = int(path.read_text().strip() or 0)
            except (OSError, ValueError):
                holder = 0
            if holder and holder != os.getpid() and _alive(holder):
                raise ConfigError(f"--out {out} is in use by another fedsim run (pid {holder}); wait for it "
                                  "or choose another directory") from None
            path.unlink(missing_ok=True)  # stale: its process is gone
    with os.fdopen(fd, "w") as f:
        f.write(str(os.getpid()))
    try:
        yield
    finally:
        path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def staging_dir(out: Path) -> Path:
    """Where `--overwrite` writes the new run, beside the old one, until it is complete."""
    return out.parent / f".{out.name}.partial"


def prepare_output(cfg: RunConfig) -> tuple[Path, Path]:
    """(the run's --out, the directory its files are written to now). These differ under
    --overwrite of a non-empty --out: the new run is written beside it and replaces it when
    complete, so an interrupted or failed rerun never leaves a mix of the two."""
    out = Path(cfg.out or Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    cfg.out = str(out)
    staging = staging_dir(out)
    if cfg.resume:
        return out, staging if staging.is_dir() else out
    if cfg.overwrite and any(p.name != LOCK for p in out.iterdir()):
        shutil.rmtree(staging, ignore_errors=True)  # an earlier interrupted --overwrite: start it again
        staging.mkdir()
        return out, staging
    return out, out


def resumed_config(cfg: RunConfig) -> RunConfig:
    """The config saved by the interrupted run in --out (or in its --overwrite staging
    directory), to be continued as it was: options given now that differ from it are refused."""
    if not cfg.out:
        raise ConfigError("--resume needs --out: the directory of the run to continue")
    out = Path(cfg.out)
    saved_at = next((d / "config.yaml" for d in (staging_dir(out), out) if (d / "config.yaml").is_file()), None)
    if saved_at is None:
        raise ConfigError(f"--resume: {out} holds no config.yaml, so no fedsim run to continue")
    saved = RunConfig.load(saved_at)
    saved.validate_types()
    defaults, keep = RunConfig(), ("out", "resume", "overwrite")
    differ = [name for name in [*CORE, *cfg.options] if name not in keep
              and cfg.value(name) != defaults.value(name) and cfg.value(name) != saved.value(name)]
    if differ:
        given = ", ".join(f"--{n.replace('_', '-')} {cfg.value(n)} (saved: {saved.value(n)})" for n in differ)
        raise ConfigError(f"--resume continues the run saved in {saved_at} as it was; these options differ "
                          f"from it: {given}. Drop them, or start a new run in another --out")
    saved.out, saved.resume, saved.overwrite = str(out), True, False
    return saved


def replace_dir(new: Path, old: Path) -> None:
    """Put `new` where `old` is, with `old` whole until the last moment (two renames)."""
    trash = old.parent / f".{old.name}.old"
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(old, trash)
    os.replace(new, old)
    shutil.rmtree(trash, ignore_errors=True)
