"""Time in tests is a multiple of MS, so a slow machine slows the suite instead of breaking it.

Set TENEBRA_TESTS_TIME_FACTOR (default 1) to stretch every deadline in the suite at once.
"""

from __future__ import annotations

import os

MS = 0.001 * float(os.environ.get("TENEBRA_TESTS_TIME_FACTOR", "1"))
