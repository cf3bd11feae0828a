"""``python -m forecaster.demo`` (what ``make demo`` runs) = ``forecaster demo``: one CLI."""

import sys

from forecaster.cli import main

main(["demo", *sys.argv[1:]])
