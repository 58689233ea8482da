"""``python -m executors.agent ...`` is ``mlynar machine-agent ...``."""

import sys

from .cli import main

sys.exit(main())
