"""``python -m forecaster.demo``."""

import sys

from forecaster.demo.app import main

sys.exit(main())
