"""``python -m vit_fast.train`` (also what ``torchrun ... -m vit_fast.train`` starts in each process)."""

import sys

from vit_fast.train.run import main

sys.exit(main())
