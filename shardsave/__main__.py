"""python -m shardsave: the same as the `shardsave` command."""

import sys

from ._cli import main

sys.exit(main())
