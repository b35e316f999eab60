from __future__ import annotations

import sys

from mirror.cli import main

sys.exit(main())
