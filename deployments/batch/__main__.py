"""``python -m deployments.batch ...`` is ``packserve batch ...``."""

import sys

from deployments.batch.cli import main

sys.exit(main(["batch", *sys.argv[1:]]))
