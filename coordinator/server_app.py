"""The Flower ServerApp: a thin skin over `coordinator.federation`."""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from coordinator.federation import run_federation
from shared.run_config import RunConfig

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_federation(grid, RunConfig.from_flower(context.run_config))
