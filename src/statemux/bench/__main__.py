"""``python -m statemux.bench``: the same as ``statemux bench``."""

import sys

from . import main

sys.exit(main(sys.argv[1:]))
