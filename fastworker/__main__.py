"""`python -m fastworker`: the same as the `fastworker` command."""

import sys

from fastworker.cli import main

sys.exit(main())
