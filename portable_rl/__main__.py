"""`python -m portable_rl` is the `portable-rl` command."""

import sys

from portable_rl.cli import main

sys.exit(main())
