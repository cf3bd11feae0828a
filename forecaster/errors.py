"""One exception family, so the CLI can turn any expected failure into one line and an exit code."""

from __future__ import annotations


class ForecasterError(ValueError):
    """An expected failure caused by input (files, options, data, bundles), not by a bug.

    The message is written for the user: the CLI prints it as ``error: <message>`` and exits 2.
    """


class DataError(ForecasterError):
    """The CSV data cannot be used as asked (missing file or column, non-numeric, too short)."""


class BundleError(ForecasterError):
    """A model bundle is missing, corrupt, or does not match its manifest."""


class ConfigError(ForecasterError):
    """The daemon configuration is invalid; the message names each offending key path."""
