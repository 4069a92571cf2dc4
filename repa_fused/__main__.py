"""``python -m repa_fused ...`` is the ``repa-fused`` command (handy under ``torchrun -m repa_fused``)."""

import sys

from .tools.cli import main

sys.exit(main())
