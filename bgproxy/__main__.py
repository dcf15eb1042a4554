"""`python -m bgproxy` is the `bgproxy` command."""

import sys

from .cli import main

sys.exit(main())
