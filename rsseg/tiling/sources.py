"""Names of inputs GDAL reads: local files, or remote objects that have no ``Path`` and must not get one.

A remote name is a GDAL virtual file system path (``/vsicurl/https://...``, ``/vsis3/bucket/key``,
``/vsigs/...``, ``/vsiaz/...``, ``/vsizip/...``) or a URL (``s3://``, ``gs://``, ``https://``, ...), which
rasterio and pyogrio map to GDAL's ``/vsis3/``, ``/vsigs/``, ``/vsicurl/`` themselves. Such a name is passed
to GDAL as it was given: ``Path`` would fold its ``//`` (``https:/host``), ``is_file()`` is False for it and
``resolve()`` would prefix the working directory. Credentials and endpoints come from GDAL's usual
configuration (``AWS_*``, ``GS_*``, ``GDAL_HTTP_*`` environment variables).

No GDAL import here: the ``rsseg`` command checks names with it before anything heavy loads.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

__all__ = ["display_name", "is_remote", "source_name"]

_REMOTE = re.compile(r"^(/vsi[a-z0-9_]+/|[a-zA-Z][a-zA-Z0-9+.-]*://)")


def is_remote(name: str | os.PathLike[str]) -> bool:
    """True for a GDAL virtual file system path or a URL (``s3://``, ``gs://``, ``https://``, ...)."""
    return isinstance(name, str) and bool(_REMOTE.match(name))


def source_name(name: str | os.PathLike[str]) -> str:
    """What GDAL opens, in any process: a remote name as given, a local path made absolute."""
    return name if is_remote(name) else str(Path(name).resolve())


def display_name(name: str | os.PathLike[str]) -> str:
    """The last part of the name (``scene.tif`` of ``/vsicurl/https://host/a/scene.tif?sig=...``)."""
    text = os.fspath(name)
    return text.split("?", 1)[0].rstrip("/").rsplit("/", 1)[-1] if is_remote(text) else Path(text).name
