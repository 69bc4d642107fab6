"""python -m shardsave: the same as the `shardsave` command."""

import sys

from shardsave.cli import main

sys.exit(main())
