"""``python -m dwdp.cli``: the ``dwdp`` command."""

import sys

from . import main

sys.exit(main())
