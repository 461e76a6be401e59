"""The rsseg exception tree.

Every error rsseg raises on purpose derives from :class:`RssegError`, and also from the built-in
exception a caller would naturally catch (``ValueError`` for bad values, ``OSError`` for files), so
``except ValueError`` keeps working for code that does not know about rsseg.

Messages name the offending value, what was expected and, where possible, the fix.
"""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "DatasetError",
    "OutputExistsError",
    "PipelineError",
    "RasterError",
    "RLEError",
    "RssegError",
    "SubmissionError",
    "VectorError",
    "WindowIndexError",
]


class RssegError(Exception):
    """Root of every error rsseg raises deliberately."""


class RLEError(RssegError, ValueError):
    """A run-length string that does not follow the Tianchi convention."""


class SubmissionError(RssegError, ValueError):
    """A competition file (mask CSV, submission) with missing, extra or malformed rows."""


class ConfigError(RssegError, ValueError):
    """A configuration or pipeline definition with an unknown key or a wrong value."""


class DatasetError(RssegError, ValueError):
    """A dataset that is empty, inconsistent or has images of the wrong size."""


class OutputExistsError(RssegError, FileExistsError):
    """An output that exists and is not to be replaced (``overwrite`` is off)."""


class RasterError(RssegError, OSError):
    """A raster that cannot be read, lacks a CRS, or does not have the expected bands."""


class WindowIndexError(RssegError, IndexError):
    """A grid position outside a grid of windows."""


class VectorError(RssegError, OSError):
    """A vector file that cannot be read or written, or has an unsupported format."""


class CheckpointError(RssegError, OSError):
    """A checkpoint that is missing, not an rsseg checkpoint, or of another architecture."""


class PipelineError(RssegError, RuntimeError):
    """A pipeline stage that failed after its retries."""
