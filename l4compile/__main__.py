"""`python -m l4compile ...`: the CLI (what torchrun launches: `torchrun -m l4compile train ...`)."""

import sys

from l4compile.cli import main

sys.exit(main())
