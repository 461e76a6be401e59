"""Names of inputs GDAL reads: moved to :mod:`rsseg.fileio` (``is_remote``, ``source_name``, ``display_name``).

Kept so that code written against this module keeps importing; new code imports from :mod:`rsseg.fileio`.
"""

from __future__ import annotations

from rsseg.fileio import display_name, is_remote, source_name

__all__ = ["display_name", "is_remote", "source_name"]
