"""``python -m sam_reuse.cli`` is ``export-and-tune``."""

import sys

from sam_reuse.cli import main

sys.exit(main())
