"""python -m bench.model: the prediction tables (bench/model/__init__.py)."""

import sys

from .predict import main

sys.exit(main())
