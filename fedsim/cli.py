"""The `fedsim` command line."""

from __future__ import annotations

import inspect
import os
import sys
import tempfile
import time
import traceback
from dataclasses import fields
from pathlib import Path
from typing import Optional, get_type_hints

import numpy as np
import typer
from rich import box
from rich.console import Console
from rich.table import Table

from fedsim.config import CORE, GROUPS, ConfigError, RunConfig

app = typer.Typer(help="fedsim: federated-learning privacy testbed. A curious Flower server attacks "
                       "what clients send while fine-tuning CLIP; see what leaks.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False)
console = Console()


def main() -> None:
    """The `fedsim` command. A user's mistake is a ConfigError, which each command turns into
    `error: ...` and exit 2; an interrupted run says what it kept (exit 130, or 143 on SIGTERM).
    Anything else is a bug: one line saying so, and the traceback in a log file, not on screen."""
    try:
        app()
    except Exception as exc:
        log = crash_log()
        console.print(f"[red]fedsim hit a bug[/] ({type(exc).__name__}: {exc}). This is not your input's "
                      f"fault; the traceback is in {log} (please attach it to a bug report)")
        sys.exit(1)


def crash_log() -> Path:
    """Write the exception being handled, with the command line, to a log file; return its path."""
    from fedsim.models.pretrain import cache_root

    logs = cache_root() / "logs"
    try:
        logs.mkdir(parents=True, exist_ok=True)
    except OSError:
        logs = Path(tempfile.gettempdir())
    path = logs / f"crash-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    path.write_text(f"fedsim {' '.join(sys.argv[1:])}\n\n{traceback.format_exc()}")
    return path


def _stopped(exc) -> typer.Exit:
    console.print(f"[yellow]{exc.message}[/]")
    return typer.Exit(exc.exit_code)


def _run(verbose: bool = False, **options) -> None:
    from fedsim.interrupts import RunStopped

    try:
        cfg = RunConfig(**options)
        from fedsim.report import print_result
        from fedsim.runner import run

        print_result(console, run(cfg, console=console, verbose=verbose))
    except ConfigError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    except RunStopped as exc:
        raise _stopped(exc) from None


def _core_options(names: tuple[str, ...] | None = None) -> list[inspect.Parameter]:
    """One option per core RunConfig field (all, or those in `names`), with its default, help
    and --help panel."""
    types = get_type_hints(RunConfig)
    return [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=types[f.name],
                              default=typer.Option(f.default, help=f.metadata["help"],
                                                   rich_help_panel=f.metadata["group"]))
            for f in fields(RunConfig) if f.name in CORE and (names is None or f.name in names)]


def plugin_panel(known) -> str:
    """The --help panel of a plugin option: the plugin's name, or `every attack`."""
    from fedsim.plugins import attack_names

    if known.group == "attack" and set(known.plugins) == set(attack_names()):
        return "attack: every attack"
    return f"{known.group}: {', '.join(known.plugins)}"


def _plugin_options() -> list[inspect.Parameter]:
    """One option per declared plugin option (`--dp-noise`), under its plugin's panel."""
    from fedsim.options import declared

    params = []
    for key, known in declared().items():
        opt = known.option
        hint = f" (valid: {opt.valid})" if opt.valid else f" (valid: {', '.join(map(str, opt.choices))})" \
            if opt.choices else ""
        params.append(inspect.Parameter(key, inspect.Parameter.KEYWORD_ONLY, annotation=Optional[opt.kind],
                                        default=typer.Option(opt.default, help=opt.help + hint,
                                                             rich_help_panel=plugin_panel(known))))
    return params


def _run_signature() -> inspect.Signature:
    """`fedsim run`'s options: the core fields, then every installed plugin's, by panel."""
    order = {group: i for i, group in enumerate(GROUPS)}
    params = sorted(_core_options() + _plugin_options(),
                    key=lambda p: order[p.default.rich_help_panel.split(":")[0]])
    params.append(inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                    default=typer.Option(False, "--verbose", "-v", rich_help_panel="run",
                                                         help="show Flower's and Ray's logs")))
    return inspect.Signature(params)


_run.__signature__ = _run_signature()
app.command("run", help="Run a federated simulation, attack every client update, score what leaked. "
                        "Writes config.yaml, results.csv, metrics.csv, timings.json, observations/ and "
                        "reconstructions/*.png to --out. Options are grouped by concern; each attack's "
                        "and defense's own options sit under its name (`fedsim list` shows them too).",
        context_settings={"max_content_width": 120})(_run)


def _audit(audit_noise: float = 0.0, audit_rel_damping: float = 1e-4, **options) -> None:
    from datetime import datetime

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    try:
        # the audit only adds audit.csv (and its page): a finished run's directory is a valid --out
        cfg = RunConfig(**{**options, "overwrite": True})
        cfg.validate()
        out = Path(cfg.out or Path("runs") / f"audit-{datetime.now():%Y%m%d-%H%M%S}")
        import torch

        from fedsim.audit import audit
        from fedsim.harness import Setting

        threads = torch.get_num_threads()
        torch.set_num_threads(1)  # tiny Jacobian products: more threads only contend
        columns = (TextColumn("auditing clients"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
        try:
            with Progress(*columns, console=console, transient=True) as bar:
                job = bar.add_task("audit", total=None)
                frame = audit(Setting(cfg), noise=audit_noise, rel_damping=audit_rel_damping,
                              progress=lambda done, total: bar.update(job, completed=done, total=total))
        finally:
            torch.set_num_threads(threads)
    except (ConfigError, ValueError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    from fedsim.pages import write_run_page

    out.mkdir(parents=True, exist_ok=True)
    # next to a run's own files (--out of a finished run): the audit keeps its config apart
    cfg.save(out / ("audit_config.yaml" if (out / "results.csv").exists() else "config.yaml"))
    frame.to_csv(out / "audit.csv", index=False)
    page = write_run_page(out)
    console.print(audit_tables(frame))
    notes = frame["perturbation"].iloc[0] if len(frame) else "none"
    console.print(f"perturbation audited: {notes}; {frame['reliable'].mean():.0%} of the estimates reliable; "
                  f"wrote {out / 'audit.csv'} and {page}")


def audit_tables(frame):
    """Per client, then per class (medians): I2F, its lower bound, the predicted RMSE and PSNR."""
    from rich.console import Group

    from fedsim.audit import summary

    def psnr(v):
        return "-" if np.isnan(v) else f"{v:.1f}"

    clients = Table(title="I2F per client", box=box.SIMPLE)
    for col in ("round", "client", "label", "space", "i2f", "i2f lb", "pred. RMSE", "pred. PSNR dB", "reliable"):
        clients.add_column(col, justify="right")
    for r in frame.itertuples():
        clients.add_row(str(r.round), str(r.client), str(r.label), r.space, f"{r.i2f:.4g}", f"{r.i2f_lb:.2g}",
                        f"{r.rmse_pred:.4f}", psnr(r.psnr_pred), "yes" if r.reliable else "[yellow]no[/]")
    per_class = Table(title="I2F per class (medians)", box=box.SIMPLE)
    for col in ("space", "label", "clients", "i2f", "pred. RMSE", "pred. PSNR dB"):
        per_class.add_column(col, justify="right")
    for (space, label), r in summary(frame)["per_class"].iterrows():
        per_class.add_row(space, str(label), str(int(r["clients"])), f"{r['i2f']:.4g}", f"{r['rmse_pred']:.4f}",
                          psnr(r["psnr_pred"]))
    return Group(clients, per_class)


def _audit_signature() -> inspect.Signature:
    """`fedsim run`'s options (without --verbose) plus the audit's own."""
    params = [p for p in _run_signature().parameters.values() if p.name != "verbose"]
    params += [inspect.Parameter("audit_noise", inspect.Parameter.KEYWORD_ONLY, annotation=float,
                                 default=typer.Option(0.0, help="std of Gaussian noise added to every entry of "
                                                      "the gradient, on top of the defense's perturbation "
                                                      "(the perturbation to audit under --defense none)",
                                                      rich_help_panel="audit")),
               inspect.Parameter("audit_rel_damping", inspect.Parameter.KEYWORD_ONLY, annotation=float,
                                 default=typer.Option(1e-4, help="damping of J J^T, relative to its largest "
                                                      "eigenvalue (0 = the undamped pseudo-inverse)",
                                                      rich_help_panel="audit"))]
    return inspect.Signature(params)


_audit.__signature__ = _audit_signature()
app.command("audit", help="Predict, without attacking, how far an optimal gradient-inversion attacker lands "
                          "from each client's batch in every round under the configured defense: the Inversion "
                          "Influence Function (I2F, Zhang et al., NeurIPS 2023, arXiv 2309.13016). Pixels for "
                          "classic models, the image embedding for CLIP PEFT. Writes audit.csv, config.yaml "
                          "and report.html to --out; with --out of a finished run, adds the audit to its "
                          "report page (its config as audit_config.yaml). Prints a per-client and a "
                          "per-class summary.",
            context_settings={"max_content_width": 120})(_audit)


data_app = typer.Typer(help="Inspect datasets and client partitions.", no_args_is_help=True)
app.add_typer(data_app, name="data")
DATA_FIELDS = ("clients", "batch_size", "dataset", "image_size", "data_root", "download",
               "synthetic_classes", "synthetic_size", "partition", "alpha", "shards", "seed")


def _describe(**options) -> None:
    try:
        cfg = RunConfig(**options)
        cfg.validate_data()
        from fedsim.data import federated_data

        data = federated_data(cfg)
    except ConfigError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    console.print(describe_table(cfg, data))


def describe_table(cfg: RunConfig, data) -> Table:
    """Per-client image and class counts, then the public split."""
    names = data.private.class_names
    per_class = len(names) <= 10  # one column per label; otherwise the most common classes
    how = {"dirichlet": f"dirichlet, alpha {cfg.alpha}", "shard": f"shard, {cfg.shards} classes each"}
    caption = "labels: " + ", ".join(f"{k} {name}" for k, name in enumerate(names)) if per_class else None
    table = Table(title=f"{cfg.dataset}: {len(data.private)} private images across {cfg.clients} clients "
                        f"({how.get(cfg.partition, cfg.partition)}), {len(data.public)} public",
                  caption=caption, box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for column in ("client", "images", "classes"):
        table.add_column(column, justify="right", no_wrap=True)
    labels = data.private.labels.numpy()
    widest = len(str(max(np.bincount(labels).max(), np.bincount(data.public.labels.numpy()).max())))
    for column in [str(k) for k in range(len(names))] if per_class else ["most common classes"]:
        table.add_column(column, justify="right" if per_class else "left", no_wrap=per_class,
                         min_width=widest if per_class else None)
    rows = [(str(c), labels[idx]) for c, idx in enumerate(data.client_indices)]
    for name, row_labels in [*rows, ("public", data.public.labels.numpy())]:
        counts = np.bincount(row_labels, minlength=len(names))
        if per_class:
            cells = [str(n) if n else "." for n in counts]
        else:
            top = np.argsort(-counts, kind="stable")[:5]
            cells = [", ".join(f"{names[k]} {counts[k]}" for k in top if counts[k])]
        table.add_row(name, str(len(row_labels)), str(int((counts > 0).sum())), *cells,
                      end_section=name == str(cfg.clients - 1))
    return table


_describe.__signature__ = inspect.Signature(_core_options(DATA_FIELDS))
data_app.command("describe", help="Load a dataset, partition it as `fedsim run` would and print "
                                  "each client's image and class counts and the public split.")(_describe)


@app.command("sweep")
def sweep_grid(
    grid: Path = typer.Argument(..., help="grid file: base / grid / trials / report (see experiments/README.md)"),
    address: str = typer.Option(None, help="Ray cluster to run on: auto, HOST:PORT or ray://HOST:PORT; "
                                           "none = start a local Ray instance"),
    gpus_per_trial: float = typer.Option(None, help="GPUs each trial asks Ray for; default 1 when the "
                                                    "cluster has GPUs, else 0"),
    cpus_per_trial: float = typer.Option(1.0, help="CPUs each trial asks Ray for (and its torch threads)"),
    max_concurrent: int = typer.Option(None, help="at most this many trials submitted at once; default: "
                                                  "twice as many as the cluster's resources run together"),
    out: Path = typer.Option(None, help="sweep directory; default runs/sweep-<grid file name>. Re-running "
                                        "with the same one skips finished trials"),
) -> None:
    """Run every trial of a grid as a Ray task, one results table (Parquet + CSV), pivots and plots."""
    from fedsim.grid import load_grid
    from fedsim.interrupts import RunStopped
    from fedsim.sweep import sweep

    try:
        spec = load_grid(grid)
        sweep(spec, out or Path("runs") / f"sweep-{grid.stem}", address=address, gpus_per_trial=gpus_per_trial,
              cpus_per_trial=cpus_per_trial, max_concurrent=max_concurrent, console=console)
    except ConfigError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    except RunStopped as exc:
        raise _stopped(exc) from None


@app.command("list")
def list_plugins() -> None:
    """List the installed attack and defense plugins, each with its options and their defaults."""
    from fedsim.options import plugin_keys
    from fedsim.plugins import ATTACK_GROUP, DEFENSE_GROUP, available

    for title, group in (("attacks", ATTACK_GROUP), ("defenses", DEFENSE_GROUP)):
        table = Table(title=f"{title} ({group})", show_lines=True)
        table.add_column("name")
        table.add_column("provided by")
        table.add_column("summary")
        table.add_column("options (default)")
        for name, ep in sorted(available(group).items()):
            obj = ep.load()
            doc = (inspect.getdoc(inspect.getmodule(obj)) or inspect.getdoc(obj) or "").splitlines()
            options = "\n".join(f"--{key.replace('_', '-')} ({describe_default(obj, opt)})"
                                 for key, opt in plugin_keys(obj, name).items())
            table.add_row(name, ep.value, doc[0] if doc else "", options)
        console.print(table)


def describe_default(plugin, opt) -> str:
    """An option's default; an unset one (None) shows what the plugin's constructor takes instead."""
    if opt.default is not None:
        return str(opt.default)
    own = inspect.signature(plugin.__init__).parameters.get(opt.name)
    if own is None or own.default is inspect.Parameter.empty:
        return "unset"
    return f"unset: {own.default:,}" if isinstance(own.default, (int, float)) else f"unset: {own.default}"


@app.command("flwr-config")
def flwr_config() -> None:
    """Print the `[tool.flwr.app.config]` table for `flwr run`: every `fedsim run` option with its
    default, installed plugins' included. Paste it into your Flower App's pyproject.toml."""
    console.print(flwr_app_config(), markup=False, highlight=False, soft_wrap=True)


def flwr_app_config() -> str:
    """The `[tool.flwr.app.config]` table, derived from RunConfig's core fields and the installed
    plugins' option declarations (an unset option is written as an empty string)."""
    import tomli_w

    from fedsim.options import declared

    values = {name.replace("_", "-"): getattr(RunConfig(), name) for name in CORE}
    values.update({key.replace("_", "-"): "" if d.option.default is None else d.option.default
                   for key, d in declared().items()})
    return "[tool.flwr.app.config]\n" + tomli_w.dumps(values)


@app.command("report")
def report_page(
    directory: Path = typer.Argument(..., help="a run directory (results.csv) or a sweep directory (results.parquet)"),
    open_page: bool = typer.Option(False, "--open", help="open the page in the default browser"),
) -> None:
    """Rebuild report.html, the self-contained page of a run or a sweep (older ones included)."""
    from fedsim.pages import write_page

    try:
        page = write_page(directory)
    except (FileNotFoundError, ValueError) as exc:  # not a run or sweep directory; a config.yaml not YAML
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None
    console.print(f"report: {page}")
    if open_page:
        import webbrowser

        webbrowser.open(page.resolve().as_uri())


@app.command("demo")
def demo(
    out: Path = typer.Option(Path("runs/demo"), help="where the demo writes its page and pictures"),
    open_page: bool = typer.Option(False, "--open", help="open the page in the default browser"),
) -> None:
    """A teaching scenario in about 3 minutes on a laptop CPU: four clients' gradients attacked with no
    defense, under DP-SGD at two strengths and under pruning, and what each defense cost in accuracy,
    on one page (demo.html)."""
    import webbrowser

    from fedsim.demo import run_demo

    page = run_demo(out, console)
    console.print(f"demo: open [bold]{page}[/] in a browser")
    if open_page:
        webbrowser.open(page.resolve().as_uri())


@app.command("pretrain")
def pretrain_tiny_clip(rebuild: bool = typer.Option(False, help="train again even if a checkpoint is cached")) -> None:
    """Build (or find) the pre-trained tiny CLIP checkpoint that --pretrained fedsim loads."""
    from fedsim.models.pretrain import ensure_pretrained

    console.print(f"tiny CLIP checkpoint: {ensure_pretrained(console=console, rebuild=rebuild)}")


@app.command("models")
def list_models() -> None:
    """List the models --model takes, with open_clip's pretrained tags (downloaded when online)."""
    import open_clip

    from fedsim.config import CLASSIC_MODELS, CLIP_PEFT

    tags: dict[str, list[str]] = {}
    for name, tag in open_clip.list_pretrained():
        tags.setdefault(name, []).append(tag)
    table = Table(title="models (--model) and their --pretrained tags")
    table.add_column("model")
    table.add_column("--peft")
    table.add_column("--pretrained")
    table.add_row("tiny-clip", ", ".join(CLIP_PEFT), "fedsim (pre-trained by fedsim, cached), none")
    for name in CLASSIC_MODELS:
        table.add_row(name, "full", "none")
    for name in open_clip.list_models():
        if not name.startswith("fedsim-"):
            table.add_row(name, "as tiny-clip", ", ".join(["none", *tags.get(name, [])]) + ", or a file")
    console.print(table)


@app.command("attack")
def attack_file(
    observation: Path = typer.Argument(..., help="an observation file saved by a run (observations/*.pt)"),
    attack: str = typer.Option("mip", help="attack plugin to run"),
    attack_iters: int = typer.Option(None, help="optimiser iterations of the attack; unset = the attack's "
                                                "own default (`fedsim list`)"),
    attack_seed: int = typer.Option(None, help="the attack's own random seed; unset = the saved run's "
                                               "(else 0)"),
    out: Path = typer.Option(Path("replay.png"), help="where to save the reconstructed images"),
    dataset: str = typer.Option("", help="the server's public split (MIP's priors learn from it); default: "
                                "the run's config.yaml next to the observations folder, else digits"),
    pretrained: str = typer.Option(None, help="the checkpoint to build the model from, where the observation "
                                   "names a file (a replayed file never chooses what is loaded)"),
) -> None:
    """Replay a saved observation: run an attack on it offline, built from the same knowledge the
    run's server had, and save the reconstruction."""
    from fedsim.replay import replay

    try:
        replay(observation, attack, attack_iters, attack_seed, out, console, dataset or None, pretrained)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


if __name__ == "__main__":
    main()
