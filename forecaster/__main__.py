"""``python -m forecaster`` runs the CLI."""

from forecaster.cli import main

main()
