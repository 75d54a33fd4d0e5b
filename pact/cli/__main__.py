"""`python -m pact.cli` runs the `pact` command (as torchrun and accelerate launch it)."""

import sys

from pact.cli.main import main

sys.exit(main())
