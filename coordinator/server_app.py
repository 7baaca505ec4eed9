"""The Flower ServerApp: a thin skin over `coordinator.federation`."""

from __future__ import annotations

import logging

from flwr.app import Context
from flwr.app.exception import AppExitException
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.exit import ExitCode

from coordinator.federation import run_federation
from coordinator.nodes import NotEnoughNodes
from shared.errors import USER_ERRORS, one_line
from shared.run_config import RunConfig

log = logging.getLogger("flwr.nextquill")

app = ServerApp()


class RunStopped(AppExitException):
    """The run cannot go on for a reason its operator can fix (a config value, a path, too few
    SuperNodes); the message says which. Progress so far is in the run directory's checkpoint."""

    exit_code = ExitCode.SERVERAPP_STRATEGY_PRECONDITION_UNMET


@app.main()
def main(grid: Grid, context: Context) -> None:
    try:
        run_federation(grid, RunConfig.from_flower(context.run_config))
    except (*USER_ERRORS, NotEnoughNodes) as error:
        log.debug("details", exc_info=True)
        log.error("run stopped: %s", one_line(error))
        raise RunStopped(one_line(error)) from None
