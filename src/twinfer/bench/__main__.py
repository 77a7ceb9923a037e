"""``python -m twinfer.bench``: the same as ``twinfer bench``."""

import sys

from twinfer.bench import main

sys.exit(main())
