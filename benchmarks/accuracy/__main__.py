"""``python -m benchmarks.accuracy``: see :mod:`benchmarks.accuracy.run`."""

from benchmarks.accuracy.run import main

raise SystemExit(main())
