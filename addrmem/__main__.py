"""``python -m addrmem``: the ``addrmem`` command (:func:`addrmem.cli.main`)."""

import sys

from .cli import main

sys.exit(main())
