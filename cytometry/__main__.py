"""``python -m cytometry`` is the ``cytometry`` command."""
import sys

from cytometry.outputs.cli import main

sys.exit(main())
