"""``python -m sap COMMAND …`` is the same as the ``sap`` console script."""

import sys

from sap.cli import main

sys.exit(main())
