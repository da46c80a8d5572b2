"""``python -m jaxtune ...`` is the ``jaxtune`` command."""

import sys

from jaxtune.cli import main

sys.exit(main())
