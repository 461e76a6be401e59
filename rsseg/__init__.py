"""rsseg: find buildings in aerial and satellite images.

The library is one module per stage (see ARCHITECTURE.md); the ``rsseg`` command and the pipeline runner
are thin layers over it. Only the CLI configures logging; the package itself adds a NullHandler.
"""

import logging
from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("rsseg")
except PackageNotFoundError:  # pragma: no cover - running from a source tree without installing
    __version__ = "0.0.0"

__all__ = ["__version__"]

logging.getLogger(__name__).addHandler(logging.NullHandler())
