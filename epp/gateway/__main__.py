"""`python -m epp.gateway gateway|bbr ...`: the sub-commands without the rest of epp's CLI."""

import sys

from epp.gateway.cli import main

sys.exit(main())
