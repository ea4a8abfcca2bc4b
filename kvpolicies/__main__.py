"""``python -m kvpolicies ...`` is the ``kvpolicies`` command (``accelerate launch -m kvpolicies lm-eval ...`` too)."""

import sys

from kvpolicies.cli import main

sys.exit(main())
