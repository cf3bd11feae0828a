"""The daemon's public name: :class:`Daemon` lives in :mod:`forecaster.serve.lifecycle`.

Kept so ``from forecaster.serve.daemon import Daemon`` (the CLI, tests, older scripts) goes on
working after the split into routes, intake, responder and lifecycle.
"""

from forecaster.serve.intake import Work
from forecaster.serve.lifecycle import HEALTH_TIMEOUT, STOP_TIMEOUT, Daemon
from forecaster.serve.routes import Route, compatible

__all__ = ["HEALTH_TIMEOUT", "STOP_TIMEOUT", "Daemon", "Route", "Work", "compatible"]
