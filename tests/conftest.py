"""Shared test settings: headless plotting, and hypothesis without deadlines (CI machines are slow)."""

import os

from hypothesis import settings

os.environ.setdefault("MPLBACKEND", "Agg")

settings.register_profile("rsseg", deadline=None, print_blob=True)
settings.load_profile("rsseg")
