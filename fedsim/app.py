"""The Flower-native entry point: `flwr run .` runs fedsim's ServerApp and ClientApp as a Flower
App (`[tool.flwr.app.components]` in pyproject.toml points here).

The run configuration comes from Flower's run config, whose keys are the `fedsim run` options
(`[tool.flwr.app.config]` lists them all with their defaults; `flwr run . --run-config
"rounds=2 attack='ig'"` overrides some). The server builds the same data, model and attack
pipeline as `fedsim run` and sends the rounds to the federation's SuperNodes; `engine` is
ignored (Flower's runtime decides how clients run). Relative `out` paths are relative to the
ServerApp process's working directory: give an absolute one.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from fedsim.config import ConfigError, RunConfig
from fedsim.flower import make_client_app

server_app = ServerApp()
client_app = make_client_app()  # reads the RunConfig from each message's run config


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    from rich.console import Console

    from fedsim.report import print_result
    from fedsim.runner import run

    cfg = RunConfig.from_run_config(context.run_config)
    nodes = len(list(grid.get_node_ids()))
    if nodes < cfg.clients:  # the strategy would wait for the missing nodes forever
        raise ConfigError(f"clients={cfg.clients} but the federation has {nodes} SuperNodes; set the "
                          f"federation's num-supernodes to {cfg.clients} or lower clients")
    console = Console()
    print_result(console, run(cfg, console=console, grid=grid))
