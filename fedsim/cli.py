"""The `fedsim` command line."""

from __future__ import annotations

import inspect
from dataclasses import fields
from pathlib import Path
from typing import get_type_hints

import typer
from rich.console import Console
from rich.table import Table

from fedsim.config import ConfigError, RunConfig

app = typer.Typer(help="fedsim: federated-learning privacy testbed. A curious Flower server attacks "
                       "what clients send while fine-tuning CLIP; see what leaks.",
                  no_args_is_help=True, add_completion=False)
console = Console()


def _run(verbose: bool = False, **options) -> None:
    try:
        cfg = RunConfig(**options)
        from fedsim.runner import run

        run(cfg, console=console, verbose=verbose)
    except ConfigError as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


def _run_signature() -> inspect.Signature:
    """`fedsim run`'s options, one per RunConfig field, with its default and help text."""
    types = get_type_hints(RunConfig)
    params = [inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, annotation=types[f.name],
                                default=typer.Option(f.default, help=f.metadata["help"]))
              for f in fields(RunConfig)]
    params.append(inspect.Parameter("verbose", inspect.Parameter.KEYWORD_ONLY, annotation=bool,
                                    default=typer.Option(False, "--verbose", "-v",
                                                         help="show Flower's and Ray's logs")))
    return inspect.Signature(params)


_run.__signature__ = _run_signature()
app.command("run", help="Run a federated simulation, attack every client update, score what leaked. "
                        "Writes config.yaml, results.csv, timings.json and reconstructions/*.png "
                        "to --out.")(_run)


@app.command("list")
def list_plugins() -> None:
    """List the installed attack and defense plugins."""
    from fedsim.plugins import ATTACK_GROUP, DEFENSE_GROUP, available

    for title, group in (("attacks", ATTACK_GROUP), ("defenses", DEFENSE_GROUP)):
        table = Table(title=f"{title} ({group})")
        table.add_column("name")
        table.add_column("provided by")
        table.add_column("summary")
        for name, ep in sorted(available(group).items()):
            obj = ep.load()
            doc = (inspect.getdoc(inspect.getmodule(obj)) or inspect.getdoc(obj) or "").splitlines()
            table.add_row(name, ep.value, doc[0] if doc else "")
        console.print(table)


@app.command("attack")
def attack_file(
    observation: Path = typer.Argument(..., help="an observation file saved by a run (observations/*.pt)"),
    attack: str = typer.Option("dlg", help="attack plugin to run"),
    attack_iters: int = typer.Option(100, help="optimiser iterations of the attack"),
    seed: int = typer.Option(0, help="the attack's own random seed"),
    out: Path = typer.Option(Path("replay.png"), help="where to save the reconstructed images"),
) -> None:
    """Replay a saved observation: run an attack on it offline and save the reconstruction."""
    from fedsim.replay import replay

    try:
        replay(observation, attack, attack_iters, seed, out, console)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        console.print(f"[red]error:[/] {exc}")
        raise typer.Exit(2) from None


if __name__ == "__main__":
    app()
