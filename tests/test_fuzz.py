"""Fuzzing the command line: generated options for `fedsim run`, `data describe` and `attack` (on
tampered observation files), generated grid files for `sweep`. A case passes when the command exits
0, or 2 with an error message: never a traceback, another exit code or a hang. The options are read
from the CLI, so new ones are fuzzed too. FEDSIM_FUZZ=ci (default): a few cases per command;
FEDSIM_FUZZ=night: 600 in all. Both from a fixed seed, so that a failure reproduces."""

from __future__ import annotations

import os
import random
import re
import shlex
import signal
import struct
import tempfile
import time
import traceback
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import click
import pytest
import torch
import typer.main
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from hypothesis.configuration import set_hypothesis_home_dir
from typer.testing import CliRunner

from fedsim.cli import app
from fedsim.config import CLASSIC_MODELS, CLIP_PEFT, DEVICES, PARTITIONS, option_types
from fedsim.datasets import SOURCES
from fedsim.grid import GRID_KEYS, METRICS, SWEEP_OWNED
from fedsim.models.pretrain import checkpoint_path
from fedsim.options import declared
from fedsim.plugins import attack_names, defense_names
from fedsim.protocol import PROTOCOLS

set_hypothesis_home_dir(Path(tempfile.gettempdir()) / "fedsim-fuzz-hypothesis")  # not .hypothesis/ in the checkout

COUNTS = {"ci": {"run": 12, "describe": 8, "attack": 10, "sweep": 12},
          "night": {"run": 200, "describe": 100, "attack": 150, "sweep": 150}}[os.environ.get("FEDSIM_FUZZ", "ci")]
# failing cases are collected, not raised (see fuzz), so hypothesis never has one to shrink
FUZZ = settings(derandomize=True, database=None, deadline=None, suppress_health_check=list(HealthCheck))
CASE_SECONDS = 60.0
PICKLE_MARKER = "FEDSIM-FUZZ-PICKLE-RAN"
PICKLE_CODE = f"cbuiltins\nprint\n(S'{PICKLE_MARKER}'\ntR.".encode()  # unpickled, it prints the marker
OBSERVATION = "observations/round1_client0.pt"  # in a run folder
CHEAP = ["--clients", "1", "--rounds", "1", "--engine", "inprocess", "--pretrained", "none"]


# ---------------------------------------------------------------- running cases
class CaseHang(BaseException):
    """A BaseException, so that no `except Exception` in fedsim swallows the alarm."""


@dataclass
class Case:
    argv: list[str]
    note: str = ""
    exit_code: int | None = None
    output: str = ""
    error: str = ""  # the traceback of an exception other than SystemExit, the hang's included
    seconds: float = 0.0

    def problem(self) -> str | None:
        if self.error:
            return self.error.rstrip().splitlines()[-1][:300]
        if "Traceback (most recent call last)" in self.output:
            return "a traceback in the output"
        if PICKLE_MARKER in self.output:
            return "loading the observation ran a pickle's code"
        if self.exit_code == 2 and "error" not in self.output.lower():
            return "exit 2 without an error message"
        return None if self.exit_code in (0, 2) else f"exit {self.exit_code}"

    def report(self) -> str:
        tail = (self.error or self.output).rstrip().splitlines()[-12:]
        lines = [f"fedsim {shlex.join(self.argv)}"[:2000]] + ([f"  {self.note}"] if self.note else [])
        lines.append(f"  problem: {self.problem()} (exit {self.exit_code}, {self.seconds:.1f} s)")
        return "\n".join(lines + ["    " + line[:240] for line in tail])


def invoke(argv: list, cwd: Path, note: str = "", seconds: float = CASE_SECONDS) -> Case:
    """`fedsim ARGV` in this process, from `cwd`, with SIGALRM after `seconds`."""
    def on_alarm(signum, frame):
        raise CaseHang(f"no exit within {seconds:g} s")

    case, here, start = Case([str(a) for a in argv], note), os.getcwd(), time.monotonic()
    previous = signal.signal(signal.SIGALRM, on_alarm)
    outer, _ = signal.setitimer(signal.ITIMER_REAL, seconds)  # pytest-timeout's alarm, if any: put back below
    try:
        os.chdir(cwd)
        result = CliRunner().invoke(app, case.argv, env={"COLUMNS": "200", "FLWR_TELEMETRY_ENABLED": "0"})
        case.exit_code, case.output = result.exit_code, result.output
        if result.exception is not None and not isinstance(result.exception, SystemExit):
            case.error = "".join(traceback.format_exception(*result.exc_info))
    except CaseHang:
        case.error = traceback.format_exc()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        os.chdir(here)
        case.seconds = time.monotonic() - start
        if outer:
            signal.setitimer(signal.ITIMER_REAL, max(outer - case.seconds, 1e-3))
    return case


def fuzz(arena, command: str, strategy, argv_of) -> None:
    """COUNTS[command] cases, each `fedsim ARGV` with (ARGV, note) = argv_of(drawn, a new folder that
    replaces {CASE}). All failing cases are reported together: hypothesis would stop at the first."""
    reports = []

    @settings(FUZZ, max_examples=COUNTS[command])
    @given(strategy)
    def case(drawn):
        where = Path(tempfile.mkdtemp(dir=arena.cases))
        argv, note = argv_of(drawn, where)
        argv = [str(arg).replace("{CASE}", str(where)) for arg in argv]
        assume("--download" not in argv or not {"mnist", "cifar10", "cifar100", "caltech101"} & set(argv))  # offline
        outcome = invoke(argv, arena.cwd, note)
        reports.append(outcome.problem() and outcome.report())

    case()
    failed = [report for report in reports if report]
    if failed:
        pytest.fail(f"{len(failed)} of {len(reports)} generated cases failed:\n\n" + "\n\n".join(failed), pytrace=False)


# ---------------------------------------------------------------- files the cases point at
def write(path: Path, content: bytes | str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    return path


def png(side: int) -> bytes:
    """A grey PNG compressed block by block: at 20000 px, a 400-megapixel decompression bomb of ~1 MB."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    comp, row = zlib.compressobj(1), b"\x00" + b"\x80" * side
    idat = b"".join(comp.compress(row * 100) for _ in range(side // 100)) + comp.compress(row * (side % 100))
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", idat + comp.flush()) + chunk(b"IEND", b""))


@pytest.fixture(scope="module")
def arena(tmp_path_factory):
    """Files and folders for the cases, and two finished tiny runs whose observations get tampered with."""
    root = tmp_path_factory.mktemp("fuzz")
    a = SimpleNamespace(cwd=root / "cwd", empty_dir=root / "empty", regular_file=write(root / "regular.txt", "text"),
                        nonempty_dir=write(root / "nonempty" / "keep.txt", "precious").parent,
                        garbage=write(root / "garbage.bin", random.Random(0).randbytes(4096)),
                        missing=root / "does" / "not" / "exist", imagefolder=root / "imagefolder",
                        roots=root / "roots", cases=root / "cases")
    a.under_file = a.regular_file / "below"
    for folder in (a.cwd, a.empty_dir, a.cases):
        folder.mkdir()
    for i in range(8):
        write(a.imagefolder / ("cat", "dog")[i % 2] / f"{i}.png", png(12))
    # data roots, each broken in one way
    write(a.roots / "no_images" / "cls" / "notes.txt", "not an image")
    write(a.roots / "corrupt_image" / "cls" / "broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    write(a.roots / "bomb" / "big" / "bomb.png", png(20000))
    write(a.roots / "bomb" / "small" / "ok.png", png(12))
    for name in ("train-images-idx3", "train-labels-idx1", "t10k-images-idx3", "t10k-labels-idx1"):
        write(a.roots / "mnist_garbage" / "MNIST" / "raw" / f"{name}-ubyte", random.Random(name).randbytes(64))
    for name, model in (("lenet", ["lenet", "--peft", "full"]), ("clip", ["tiny-clip", "--peft", "coop"])):
        done = invoke(["run", "--model", *model, *CHEAP, "--attack", "none", "--out", root / name], a.cwd, seconds=600)
        assert done.problem() is None and done.exit_code == 0, done.report()
        setattr(a, name, root / name)
    return a


# ---------------------------------------------------------------- options and their values
def command_options(*path: str) -> list[click.Option]:
    """The options of `fedsim PATH...`, as typer declares them to click."""
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return [p for p in command.params if isinstance(p, click.Option) and p.name != "help"]


# no NUL (argv cannot hold one), no lone surrogates, no path separators or `~` (a generated --out
# stays in its case's folder), not only dots (`..` would leave it too)
SAFE_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\x00/\\~"), max_size=40) \
    .filter(lambda s: s.strip(".") != "")
EDGES = {
    "int": st.sampled_from(["0", "-1", str(2**63), "9" * 400, "1.5", "nan", "", "abc"]),
    "float": st.sampled_from(["0", "-1", "nan", "inf", "-inf", "1e400", "5e-324", "", "abc"]),
    "text": st.sampled_from(["", " ", "none", ",", "a,,b", "--help", "x" * 5000, "ünïcødé 名前 🙂", "\u202eRTL"]),
}
# the valid ranges of the options that make a case slow when large, and of a few others
SMALL = dict(clients=(1, 3), rounds=(1, 2), batch_size=(1, 3), image_size=(8, 32), synthetic_classes=(1, 10),
             synthetic_size=(1, 12), shards=(1, 3), n_ctx=(1, 6), adapter_reduction=(1, 8), lora_rank=(1, 6),
             vpt_tokens=(1, 4), local_steps=(1, 2), local_epochs=(0, 1), attack_iters=(0, 2), attack_restarts=(1, 2),
             max_concurrent=(1, 4), seed=(0, 2**63 - 1), model_seed=(0, 2**63 - 1), attack_seed=(0, 2**63 - 1),
             alpha=(0.05, 5.0), lr=(1e-4, 1.0), fraction=(0.01, 1.0), attack_timeout=(0.0, 5.0),
             adapter_ratio=(0.0, 1.0), lora_alpha=(0.1, 32.0), cpus_per_trial=(0.1, 4.0), gpus_per_trial=(0.0, 1.0))


def choices(a) -> dict:
    """Valid values of the other string options, from fedsim's own lists."""
    defenses = st.sampled_from(list(defense_names()))
    pretrained = ["none", "openai", *map(str, (a.garbage, a.missing, a.empty_dir, a.under_file)), "/dev/null"]
    return {
        "engine": st.just("inprocess"),  # starting Ray alone outlasts a case (tests/test_engine.py covers it)
        "mip_prior": st.sampled_from(["ridge", "tv"]),  # the conv prior first trains decoders for minutes
        "lora_tower": st.sampled_from(["image", "text", "both"]), "address": st.sampled_from(["auto", "127.0.0.1:1"]),
        "lora_targets": st.lists(st.sampled_from(["attn", "c_fc", "c_proj"]), min_size=1, unique=True).map(",".join),
        "dataset": st.sampled_from(list(SOURCES)), "partition": st.sampled_from(PARTITIONS),
        "model": st.sampled_from([*CLASSIC_MODELS, "tiny-clip"]),  # open_clip's own models are far too slow
        "peft": st.sampled_from(CLIP_PEFT), "protocol": st.sampled_from(list(PROTOCOLS)),
        "attack": st.sampled_from(["none", *attack_names()]), "device": st.sampled_from(DEVICES),
        "defense": st.one_of(st.just("none"), defenses, st.lists(defenses, min_size=2, max_size=3).map(",".join)),
        # fedsim's tiny CLIP only once cached: building it takes minutes (tests/test_pretrain.py)
        "pretrained": st.sampled_from(pretrained + ["fedsim"] * checkpoint_path().is_file()),
        "data_root": st.sampled_from([str(p) for p in (a.imagefolder, a.empty_dir, a.regular_file, a.missing,
                                                       *a.roots.iterdir())]),
    }


def valid_values(name: str, kind: str, choices: dict):
    """An option's valid values (mostly), as command-line text."""
    plugin = declared().get(name)
    if name in choices:
        return choices[name]
    if plugin is not None and plugin.option.choices:
        return st.sampled_from([str(c) for c in plugin.option.choices])
    low, high = SMALL.get(name, (-2, 16) if kind == "int" else (-1.0, 4.0))
    if kind == "int":
        return st.integers(low, high).map(str)
    return st.floats(low, high).map(repr) if kind == "float" else SAFE_TEXT


@st.composite
def option_args(draw, opts: list[click.Option], a, choices: dict, low=1, high=3, out_file=False) -> list[str]:
    """`low` to `high` options as argv: valid values half the time, else their type's edges."""
    paths = st.sampled_from([str(p) for p in (a.regular_file, a.under_file, a.missing, a.empty_dir, a.nonempty_dir)])
    # --out: new, existing, a file, under a file, odd names; {CASE} is the case's own folder
    new = ["{CASE}/r.png", "{CASE}/new/deeper/r.jpg", "{CASE}/r"] if out_file else ["{CASE}/out2", "{CASE}/a/b/c"]
    outs = st.one_of(paths, st.sampled_from(new + ["", "x" * 300, "{CASE}"]), SAFE_TEXT.map("{CASE}/".__add__))
    argv = []
    chosen = draw(st.lists(st.sampled_from(opts), min_size=low, max_size=high, unique_by=lambda o: o.name))
    for opt in chosen:
        if opt.is_flag:
            argv.append(draw(st.sampled_from(opt.opts + opt.secondary_opts)))
            continue
        kind = "int" if isinstance(opt.type, click.types.IntParamType) else \
            "float" if isinstance(opt.type, click.types.FloatParamType) else "text"
        valid = valid_values(opt.name, kind, choices)
        edges = EDGES[kind] if kind != "text" else st.one_of(EDGES["text"], SAFE_TEXT, paths)
        argv += [draw(st.sampled_from(opt.opts)), draw(outs if opt.name == "out" else valid | edges)]
    if chosen and not chosen[-1].is_flag and draw(st.integers(0, 19)) == 0:
        argv.pop()  # its value missing
    return argv


def plugins_reading(args: list[str], pick: int | None) -> list[str]:
    """--attack/--defense choosing plugins that read the plugin options in `args`: an option no chosen
    plugin reads is refused at once. A generated --attack, later in argv, still wins."""
    chosen = {"attack": [], "defense": []}
    for known in declared().values():
        if pick is not None and known.flag in args:
            chosen[known.group].append(known.plugins[pick % len(known.plugins)])
    attack, defense = chosen["attack"][:1], ",".join(dict.fromkeys(chosen["defense"]))
    return ["--attack", *attack] * bool(attack) + ["--defense", defense] * bool(defense)


# ---------------------------------------------------------------- run, data describe
def test_fuzz_run(arena):
    def argv(drawn, where):
        lenet, peft, args, pick = drawn
        # lenet mostly; tiny CLIP (slower) so that the CLIP-only options are valid too, with dlg on
        # lora and text-adapter, where mip takes 40-60 s a client whatever --attack-iters says
        base = ["--model", "lenet", "--peft", "full"] if lenet else \
            ["--model", "tiny-clip", "--peft", peft] + ["--attack", "dlg"] * (peft in ("lora", "text-adapter"))
        # an empty --data-root: a file dataset never reads ~/.cache/fedsim/data
        return ["run", *base, *CHEAP, "--attack-iters", "1", "--data-root", arena.empty_dir, "--out", where / "out",
                *plugins_reading(args, pick), *args], ""

    options = option_args(command_options("run"), arena, choices(arena))
    fuzz(arena, "run", st.tuples(st.sampled_from([True, True, True, False]), st.sampled_from(CLIP_PEFT), options,
                                 st.none() | st.integers(0, 99)), argv)


def test_fuzz_data_describe(arena):
    def argv(args, where):
        return ["data", "describe", "--clients", "2", "--data-root", arena.empty_dir, *args], ""

    fuzz(arena, "describe", option_args(command_options("data", "describe"), arena, choices(arena)), argv)


# ---------------------------------------------------------------- attack OBSERVATION
JUNK = st.recursive(  # values of the wrong type, nested or not
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), st.just("x" * 1000)),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6) | st.integers(), inner, max_size=4),
    max_leaves=12)
SPEC_VALUES = JUNK | st.sampled_from(["lenet", "resnet18", "tiny-clip", "ViT-B-32", "nope", "coop", "lora", "full",
                                      "none", "openai", "/dev/zero", 0, -1, 1, 7, 100000, 0.5, [], ["cat", "dog"]])
TENSOR_CHANGES = {
    "nan": lambda t: torch.full_like(t.float(), float("nan")), "inf": lambda t: torch.full_like(t.float(), 1e400),
    "flat": lambda t: t.reshape(1, -1), "grow": lambda t: torch.cat([t.reshape(-1), t.reshape(-1)[:1]]),
    "empty": lambda t: t.reshape(-1)[:0], "scalar": lambda t: t.reshape(-1)[0].clone(), "int": lambda t: t.long(),
    "complex": lambda t: t.to(torch.complex64), "list": lambda t: t.reshape(-1)[:5].tolist(),
}
FILE_CHANGES = ["keep"] * 6 + ["truncate", "flip", "random", "empty", "text", "pickle_code", "zip", "directory",
                                "missing", "under_file", "/dev/null", "/dev/zero"]


def observation_recipes(a):
    """A real observation with up to three changes (a None value drops the key), alone or in a run
    folder next to its config.yaml (maybe changed), and maybe then damaged as a file."""
    metas = [torch.load(run / OBSERVATION, weights_only=True)["meta"] for run in (a.lenet, a.clip)]
    meta_keys, spec_keys = sorted(metas[0]), sorted({key for meta in metas for key in meta["model_spec"]})
    change = st.one_of(
        st.tuples(st.just("top"), st.sampled_from(["format", "meta", "update", "global_params", "x"]),
                  st.none() | JUNK),
        st.tuples(st.just("meta"), st.sampled_from(meta_keys + ["x"]), st.none() | JUNK),
        st.tuples(st.just("spec"), st.sampled_from(spec_keys + ["x"]), st.none() | SPEC_VALUES),
        st.tuples(st.just("tensor"), st.sampled_from(["update", "global_params"]),
                  st.sampled_from([*TENSOR_CHANGES, "rename", "drop"]), st.integers(0, 40)))
    config = st.one_of(st.none(), st.tuples(st.sampled_from(["image_size", "dataset", "model", "attack", "x"]),
                                            st.none() | JUNK | SPEC_VALUES),
                       st.sampled_from([b"\xff\xfe\x00garbage", b"- a\n", b"a: [\n", b"", b"42\n"]))
    return st.fixed_dictionaries(dict(source=st.sampled_from([a.lenet, a.lenet, a.clip]), in_run=st.booleans(),
                                      changes=st.lists(change, max_size=3), config=config,
                                      file=st.sampled_from(FILE_CHANGES), seed=st.integers(0, 10**6)))


def build_observation(recipe: dict, a, case: Path) -> Path:
    blob = torch.load(recipe["source"] / OBSERVATION, weights_only=True)
    for op, key, *rest in recipe["changes"]:
        meta = blob["meta"] if isinstance(blob.get("meta"), dict) else {}
        target = {"top": blob, "meta": meta, "spec": meta.get("model_spec"), "tensor": blob.get(key)}[op]
        if not isinstance(target, dict) or not target:
            continue
        if op == "tensor":
            how, name = rest[0], sorted(map(str, target))[rest[1] % len(target)]
            if how in ("rename", "drop"):
                tensor = target.pop(name)
                if how == "rename":
                    target[name + ".x"] = tensor
            elif isinstance(target[name], torch.Tensor):
                target[name] = TENSOR_CHANGES[how](target[name])
        elif rest[0] is None:
            target.pop(key, None)
        else:
            target[key] = rest[0]

    path, config = case / "observation.pt", recipe["config"]
    if recipe["in_run"]:
        path = case / "run" / OBSERVATION
        if not isinstance(config, bytes):
            saved = yaml.safe_load((recipe["source"] / "config.yaml").read_text())
            if config:
                saved[config[0]] = config[1]
            config = yaml.safe_dump(saved)
        write(case / "run" / "config.yaml", config)
        path.parent.mkdir()
    torch.save(blob, path)

    how, rng, data = recipe["file"], random.Random(recipe["seed"]), bytearray(path.read_bytes())
    if how == "flip":
        for _ in range(rng.randint(1, 8)):
            data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    junk = {"truncate": data[:rng.randrange(len(data))], "flip": data, "random": rng.randbytes(rng.randint(1, 5000)),
            "empty": b"", "text": b"round: 1\n", "pickle_code": PICKLE_CODE}
    if how in junk:
        path.write_bytes(junk[how])
    elif how == "zip":  # torch's container, junk inside
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("archive/data.pkl", rng.randbytes(100))
            z.writestr("archive/version", "3\n")
    elif how in ("directory", "missing"):
        path.unlink()
        if how == "directory":
            path.mkdir()
    return {"under_file": a.regular_file / "x.pt", "/dev/null": Path(how), "/dev/zero": Path(how)}.get(how, path)


def test_fuzz_attack(arena):
    values = {**choices(arena), "attack": st.sampled_from(["mip", "dlg", "idlg", "ig", "gradinversion", "none", "x"]),
              "dataset": st.sampled_from(["digits", "faces", "synthetic", "mnist", "imagefolder", "x"])}

    def argv(drawn, where):
        recipe, args = drawn
        return ["attack", build_observation(recipe, arena, where), "--attack", "idlg", "--attack-iters", "1",
                "--out", where / "r.png", *args], f"observation: {recipe}"[:600]

    options = option_args(command_options("attack"), arena, values, low=0, high=1, out_file=True)
    fuzz(arena, "attack", st.tuples(observation_recipes(arena), options), argv)


# ---------------------------------------------------------------- sweep GRID
def alias_bomb(where: str, depth: int) -> str:
    """A few hundred bytes of YAML whose value under `where`, expanded, is 8**depth items."""
    anchors = "".join(f"  k{i}: &a{i} [{', '.join(['lol' if i == 0 else f'*a{i - 1}'] * 8)}]\n" for i in range(depth))
    return f"grid: {{seed: [0]}}\nreport:\n{anchors}" if where == "report" else \
        f"report:\n{anchors}{where}: *a{depth - 1}\n"


def deep_list(n: int) -> str:
    return "grid: {seed: " + "[" * n + "0" + "]" * n + "}\n"


def deep_map(n: int) -> str:
    return "grid:\n" + "".join(" " * (i + 1) + "k:\n" for i in range(n)) + " " * (n + 1) + "x\n"


@st.composite
def grid_specs(draw, values: dict):
    """A grid file's mapping. Tidy (half the time): real field names, valid small values, so that it
    loads as a grid. Sloppy: also the sweep's own fields, unknown names, wrong types, empty or huge
    lists, junk."""
    types, tidy = option_types(), draw(st.booleans())
    names = sorted(set(types) - set(SWEEP_OWNED))
    axis_name, metric = st.sampled_from(names), st.sampled_from(METRICS)
    name = axis_name if tidy else st.sampled_from(names + [*SWEEP_OWNED, "nope", "", 7, None])
    if not tidy:
        axis_name, metric = axis_name | SAFE_TEXT, metric | SAFE_TEXT

    def value(field):
        kind = types.get(field)
        if kind is None:
            return JUNK
        valid = st.booleans() if kind is bool else \
            valid_values(field, {int: "int", float: "float"}.get(kind, "text"), values).map(kind)
        return valid if tidy else valid | JUNK

    def axis(field):  # at most 3 x 3 x 3 trials; or not a list, empty, or huge with one wrong value
        trials = st.lists(value(field), min_size=1, max_size=3, unique_by=repr)
        odd = st.one_of(value(field), st.just([]), st.builds(lambda v, n: [v] * n + [[1]] + [v] * 3, value(field),
                                                             st.integers(200, 3000)))
        return trials if tidy else trials | odd

    def mapping(of, low=0):
        return st.lists(name, min_size=low, max_size=3, unique_by=repr).flatmap(
            lambda keys: st.fixed_dictionaries({key: of(key) for key in keys}))

    report = st.fixed_dictionaries({}, optional={"rows": axis_name, "columns": st.lists(axis_name, max_size=2),
                                                 "values": st.lists(metric, max_size=2)})
    parts = {"base": mapping(value), "grid": mapping(axis, low=1), "trials": st.lists(mapping(value), max_size=3),
             "report": report}
    keys = draw(st.lists(st.sampled_from(GRID_KEYS), unique=True))
    spec = {key: draw(parts[key] if tidy or draw(st.integers(0, 5)) else JUNK) for key in keys + ["grid"] * tidy}
    if not tidy and draw(st.integers(0, 5)) == 0:
        spec[draw(SAFE_TEXT | st.integers() | st.none())] = draw(JUNK)
    return yaml.safe_dump(spec, allow_unicode=True)


RAW_GRIDS = st.one_of(
    st.binary(min_size=1, max_size=600),
    st.sampled_from([
        b"base: {seed: \xff\xfe}\ngrid: {seed: [0]}\n", "\ufeffgrid: {seed: [0, 1]}\n".encode(),
        b"grid: {seed: [0, 1}\n", b"grid:\n\tseed: [0]\n", b"grid: {seed: [0]}\n---\ngrid: {seed: [1]}\n",
        b"grid: !!python/object/apply:os.system ['echo hi']\n", b"grid: *nowhere\n", b"? [a, b]\n: 1\n",
        b"grid: {seed: [2024-01-01]}\n", b"grid: {seed: [0]}\x00\n", b"1: a\n", b"", b"42\n", b"- grid\n",
        b"grid: {lr: [.nan, .inf]}\n", b"grid: {seed: [" + b"9" * 5000 + b"]}\n"]),
    st.integers(50, 5000).map(deep_list), st.integers(50, 3000).map(deep_map),
    st.builds(alias_bomb, st.sampled_from(["report", "base", "grid", "trials"]), st.integers(3, 7)),
)


def test_fuzz_sweep(arena):
    """`fedsim sweep GRID --out <under a regular file>`: a grid that loads is refused for its --out
    before Ray starts, so no trial ever runs."""
    values = choices(arena)
    paths = [arena.empty_dir, arena.missing, arena.under_file, arena.garbage, Path("/dev/null")]
    grids = st.sampled_from(["spec"] * 5 + ["raw"] * 4 + ["path"]).flatmap(
        lambda kind: {"spec": grid_specs(values), "raw": RAW_GRIDS, "path": st.sampled_from(paths)}[kind])

    def argv(drawn, where):
        grid, args = drawn
        path = grid if isinstance(grid, Path) else write(where / "grid.yaml", grid)
        return ["sweep", path, *args, "--out", arena.under_file / "sweep"], f"grid file: {grid!r}"[:400]

    options = option_args([o for o in command_options("sweep") if o.name != "out"], arena, values, low=0, high=1)
    fuzz(arena, "sweep", st.tuples(grids, options), argv)


# ---------------------------------------------------------------- regressions
RUN = "run --model lenet --peft full --clients 1 --attack-iters 1 --engine inprocess --pretrained none --out {case}/out"
CLIP = "run --model tiny-clip --clients 1 --attack-iters 1 --engine inprocess --pretrained none --out {case}/out"
ATTACK = "attack {obs} --attack idlg --out {case}/r.png"
SWEEP = "sweep {case}/grid.yaml --out {case}/sweep"
GRID = "{case}/grid.yaml"
HUGE = "9" * 400  # more than any float holds
BOMB = alias_bomb("report", 7)
REGRESSIONS = [  # id, argv, what the error message names, the grid file; first the issue's, then the fuzzer's
    ("run --lr nan", f"{RUN} --lr nan", ("--lr", "nan"), None),
    ("run --lr inf", f"{RUN} --lr inf", ("--lr", "inf"), None),
    ("run --dp-clip inf", f"{RUN} --defense dp --dp-clip inf", ("--dp-clip", "inf"), None),
    ("run --update-noise inf", f"{RUN} --defense dp-update --update-noise inf", ("--update-noise", "inf"), None),
    ("run --lora-alpha nan", f"{CLIP} --peft lora --lora-alpha nan", ("--lora-alpha", "nan"), None),
    ("attack --attack-iters -1", f"{ATTACK} --attack-iters -1", ("--attack-iters", "-1"), None),
    ("run --pretrained garbage-file", f"{CLIP} --peft coop --pretrained {{garbage}}", ("{garbage}",), None),
    ("run --out under a regular file", f"{RUN} --out {{under_file}}/out", ("{under_file}/out",), None),
    ("sweep --out under a regular file", f"{SWEEP} --out {{under_file}}/sweep", ("{under_file}/sweep",),
     "base: {model: lenet, peft: full, pretrained: none, clients: 1, attack: idlg}\ngrid: {seed: [0, 1]}\n"),
    ("run --seed -1", f"{RUN} --seed -1", ("--seed", "-1"), None),
    ("data describe --seed -1", "data describe --seed -1", ("--seed", "-1"), None),
    ("run --lora-targets ''", f"{CLIP} --peft lora --lora-targets ''", ("--lora-targets",), None),
    ("run --n-ctx 100000", f"{CLIP} --peft coop --n-ctx 100000", ("--n-ctx", "100000"), None),
    ("run --image-size 100000", f"{RUN} --image-size 100000", ("--image-size", "100000"), None),
    ("run --seed 2**70", f"{RUN} --seed {2**70}", ("--seed", str(2**70)), None),
    ("run --image-size 1", f"{RUN} --image-size 1", ("--image-size", "got 1"), None),
    ("sweep binary grid", SWEEP, (GRID,), random.Random(1).randbytes(256)),
    ("run imagefolder decompression bomb", f"{RUN} --dataset imagefolder --data-root {{bomb}}", ("bomb.png",), None),
    ("data describe imagefolder decompression bomb",
     "data describe --clients 1 --dataset imagefolder --data-root {bomb}", ("bomb.png",), None),
    ("run --defense dp --dp-noise nan (idlg, hung once)", "run --model lenet --peft full --attack idlg --clients 2 "
     "--engine inprocess --defense dp --dp-noise nan --out {case}/out", ("--dp-noise", "nan"), None),
    ("run --attack-iters 9...9", f"{RUN} --attack-iters {HUGE}", ("--attack-iters",), None),
    ("run --secagg-shares 9...9", f"{RUN} --clients 3 --defense secagg --secagg-shares {HUGE}", ("--secagg-shares",),
     None),
    ("attack --attack-iters 9...9", f"{ATTACK} --attack-iters {HUGE}", ("--attack-iters",), None),
    ("run --image-size 9...9", f"{RUN} --image-size {HUGE}", ("--image-size",), None),
    ("data describe --image-size 9...9", f"data describe --image-size {HUGE}", ("--image-size",), None),
    ("sweep grid nested 3000 deep", SWEEP, (GRID,), deep_list(3000)),
    ("sweep grid mapping nested 3000 deep", SWEEP, (GRID,), deep_map(3000)),
    ("sweep grid alias bomb (400 bytes, 8**7 items)", SWEEP, ("report",), BOMB),
]


@pytest.mark.parametrize("command,names,grid", [r[1:] for r in REGRESSIONS], ids=[r[0] for r in REGRESSIONS])
def test_bad_value_is_a_clean_error(arena, command, names, grid):
    """Exit 2, soon, with an error message naming the bad value."""
    where = Path(tempfile.mkdtemp(dir=arena.cases))
    if grid is not None:
        write(where / "grid.yaml", grid)

    def expand(text: str) -> str:
        return text.format(case=where, obs=arena.lenet / OBSERVATION, garbage=arena.garbage,
                           under_file=arena.under_file, bomb=arena.roots / "bomb")

    # the alias bomb's limit is tighter: quoting its value whole in the message once took minutes
    case = invoke([expand(s) for s in shlex.split(command)], arena.cwd, seconds=20 if grid == BOMB else CASE_SECONDS)
    assert case.problem() is None and case.exit_code == 2, case.report()
    message = re.sub(r"\s+", "", case.output)
    for name in names:
        assert re.sub(r"\s+", "", expand(name)) in message, f"the message does not name {name!r}:\n{case.report()}"
