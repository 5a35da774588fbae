"""pytest configuration for tests/python: makes reference.py and problems.py importable."""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
