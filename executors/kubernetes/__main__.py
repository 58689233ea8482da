import sys

from .wrapper import main

sys.exit(main())
