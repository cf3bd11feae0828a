"""``forecaster demo`` (``make demo``): the whole product on one screen.

``scenario`` says what is replayed and finds the files, ``scoreboard`` joins readings with
predictions (pure), ``view`` draws (rich or plain text), ``run`` starts and stops everything
through :mod:`forecaster.harness`. The command line is ``forecaster demo`` (typer, in
:mod:`forecaster.cli`); ``python -m forecaster.demo`` is the same command.
"""
