"""Atomic outputs and the GDAL environment every raster stage runs under.

Outputs are written under a temporary name beside the final one and renamed only when complete, so a
crash or an error never leaves a half-written file or folder under the final name.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import rasterio

from rsseg.errors import OutputExistsError

__all__ = ["atomic_dir", "atomic_path", "file_sha256", "raster_env"]

#: GDAL block cache for rsseg's readers and writers, in MB: small, so memory does not follow the scene size
#: (GDAL's default is 5% of RAM per process, 1.2 GB here, multiplied by every Dask worker).
GDAL_CACHEMAX_MB = 64


def _temporary_sibling(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex[:8]}")


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike[str], overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it to ``final`` when the block succeeds.

    The temporary file keeps ``final``'s suffix (drivers choose formats by extension). On any exception
    the temporary file is removed and ``final`` is untouched.

    Args:
        final: the path the output must end up at.
        overwrite: if False and ``final`` exists, raise :class:`~rsseg.errors.OutputExistsError` first.
    """
    final = Path(final)
    if not overwrite and final.exists():
        raise OutputExistsError(f"{final} exists; pass overwrite=True (CLI: --overwrite) to replace it")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.stem}.tmp-{uuid.uuid4().hex[:8]}{final.suffix}")
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


@contextlib.contextmanager
def atomic_dir(final: str | os.PathLike[str], overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``final``; rename it to ``final`` when the block succeeds.

    Args:
        final: the folder the output must end up at.
        overwrite: replace an existing ``final`` (after the new one is complete); otherwise an existing
            ``final`` raises :class:`~rsseg.errors.OutputExistsError` before anything is written.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise OutputExistsError(f"{final} exists; remove it or choose another output folder")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temporary_sibling(final)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            old = _temporary_sibling(final)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        # Moved aside first: writers still running elsewhere (Dask tasks) then fail to create files in it,
        # instead of refilling the folder while it is being removed.
        trash = _temporary_sibling(final)
        with contextlib.suppress(OSError):
            os.replace(tmp, trash)
            tmp = trash
        raise
    finally:
        _remove_tree(tmp)


def _remove_tree(path: Path, passes: int = 3) -> None:
    """Remove a folder; passes a moment apart catch a file whose creation was under way when it was moved."""
    for _ in range(passes):
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.05)


def file_sha256(path: str | os.PathLike[str], chunk: int = 1 << 20) -> str:
    """SHA-256 hex digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def raster_env(cache_mb: int = GDAL_CACHEMAX_MB, **options: object) -> rasterio.Env:
    """A :class:`rasterio.Env` with a small GDAL block cache (memory independent of scene size).

    ``options`` are further GDAL settings; they may override ``GDAL_NUM_THREADS`` (default ``ALL_CPUS``).
    """
    # rasterio hands an integer GDAL_CACHEMAX to GDALSetCacheMax64, which counts bytes.
    return rasterio.Env(GDAL_CACHEMAX=cache_mb << 20, **{"GDAL_NUM_THREADS": "ALL_CPUS", **options})
