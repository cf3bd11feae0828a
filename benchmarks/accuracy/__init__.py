"""The accuracy benchmark (issue 12): the model against linear references, one step ahead.

``python -m benchmarks.accuracy`` trains, exports and evaluates every series of ``data/`` through
the CLI exactly as a user would (first 80 % / last 20 %), and scores persistence, seasonal naive,
AR on levels and differences and ETS on the same held-out points. See :mod:`.run`.
"""
