"""`python -m auditgate ...`: the same as the `auditgate` command."""

import sys

from auditgate.cli import main

sys.exit(main())
