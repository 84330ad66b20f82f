"""Helpers shared by the tests (importable as `support` because pytest puts tests/ on sys.path)."""

import os

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
EXAMPLE_MP4 = os.path.join(REPO, "assets", "example.mp4")
