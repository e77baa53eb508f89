"""``python -m batched_specdec.training``: distil a draft for a target (:mod:`batched_specdec.training.distill`)."""

import sys

from batched_specdec.training.distill import main

sys.exit(main())
