"""Input names, atomic outputs and the GDAL environment every raster stage runs under.

Inputs: :func:`expand_paths` turns what a user typed (a file, a folder, a glob, a list of these, or a remote
name) into the list of inputs; a remote name is a GDAL virtual file system path (``/vsicurl/https://...``,
``/vsis3/bucket/key``, ``/vsigs/...``, ``/vsiaz/...``, ``/vsizip/...``) or a URL (``s3://``, ``gs://``,
``https://``, ...), which rasterio and pyogrio map to GDAL's ``/vsis3/``, ``/vsigs/``, ``/vsicurl/`` themselves.
Such a name is passed to GDAL as it was given: ``Path`` would fold its ``//`` (``https:/host``), ``is_file()``
is False for it and ``resolve()`` would prefix the working directory. Credentials and endpoints come from
GDAL's usual configuration (``AWS_*``, ``GS_*``, ``GDAL_HTTP_*`` environment variables).

Outputs are written under a temporary name beside the final one and renamed only when complete, so a
crash or an error never leaves a half-written file or folder under the final name.

rasterio (GDAL) is imported only by :func:`raster_env`: the ``rsseg`` command checks names before anything
heavy loads.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from rsseg.errors import ConfigError, OutputExistsError

if TYPE_CHECKING:
    import rasterio

__all__ = ["RASTER_SUFFIXES", "atomic_dir", "atomic_path", "display_name", "expand_paths", "file_sha256",
           "fill_stem", "is_remote", "raster_env", "source_name", "stem_of"]

#: What a folder of rasters is read for (case-insensitive).
RASTER_SUFFIXES = (".tif", ".tiff")

_REMOTE = re.compile(r"^(/vsi[a-z0-9_]+/|[a-zA-Z][a-zA-Z0-9+.-]*://)")
_GLOB = re.compile(r"[*?[]")

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


def file_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 hex digest of a file, read in 1 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def raster_env(**options: object) -> rasterio.Env:
    """A :class:`rasterio.Env` with a small GDAL block cache (:data:`GDAL_CACHEMAX_MB`, whatever the scene size).

    ``options`` are further GDAL settings; they may override ``GDAL_NUM_THREADS`` (default ``ALL_CPUS``).
    """
    import rasterio

    # rasterio hands an integer GDAL_CACHEMAX to GDALSetCacheMax64, which counts bytes.
    return rasterio.Env(GDAL_CACHEMAX=GDAL_CACHEMAX_MB << 20, **{"GDAL_NUM_THREADS": "ALL_CPUS", **options})


# ------------------------------------------------------------------------------------------ input names
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


def stem_of(name: str | os.PathLike[str]) -> str:
    """The name without folder and last suffix (``scene`` of ``s3://b/scene.tif`` and of ``data/scene.tif``)."""
    return Path(display_name(name)).stem


def expand_paths(spec: str | os.PathLike[str] | Sequence[str | os.PathLike[str]],
                 suffixes: Sequence[str] = RASTER_SUFFIXES) -> list[str | Path]:
    """The inputs a user named, in order, each once: local files as ``Path``, remote names as given (``str``).

    Each entry of ``spec`` (one, or a list) is a file, a folder (its files ending in one of ``suffixes``,
    case-insensitive, hidden files left out, sorted), a glob pattern (``*``, ``?``, ``[...]``, ``**``; its
    files, sorted) or a remote name (``/vsi*/``, ``s3://``, ``gs://``, ``http(s)://``), which is not checked here:
    GDAL reports a missing remote object when it opens it.

    Raises:
        ConfigError: an entry that is neither an existing file nor a folder nor a glob, a glob that matches no
            file, a folder without any ``suffixes`` file, or an empty list; the message names the entry.
    """
    entries = [spec] if isinstance(spec, str | os.PathLike) else list(spec)
    if not entries:
        raise ConfigError("no inputs given; expected a file, a folder, a glob or a list of these")
    found: list[str | Path] = []
    for entry in entries:
        found += _expand_one(entry, tuple(s.lower() for s in suffixes))
    return list(dict.fromkeys(found))


def _expand_one(entry: str | os.PathLike[str], suffixes: tuple[str, ...]) -> list[str | Path]:
    if is_remote(entry):
        return [os.fspath(entry)]
    path = Path(entry)
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir()
                       if p.suffix.lower() in suffixes and not p.name.startswith(".") and p.is_file())
        if not files:
            raise ConfigError(f"{entry}: the folder holds no {'/'.join(suffixes)} file; expected a folder of "
                              "rasters, or name the files (a glob like 'DIR/*.jp2' or a list)")
        return list(files)
    if not _GLOB.search(os.fspath(entry)):
        raise ConfigError(f"{entry}: no such file or folder; expected an existing file, a folder, a glob or a "
                          "remote name (/vsicurl/https://..., s3://..., gs://...)")
    files = sorted(Path(p) for p in glob.glob(os.fspath(entry), recursive=True) if os.path.isfile(p))
    if not files:
        raise ConfigError(f"{entry}: the pattern matches no file; check the folder and the suffix "
                          "(patterns are case-sensitive)")
    return list(files)


def fill_stem(pattern: str | os.PathLike[str], stem: str, what: str = "--labels") -> str | Path:
    """``pattern`` with ``{stem}`` replaced by ``stem``; a local result must exist, a remote one is kept as given.

    Raises:
        ConfigError: the filled-in local file does not exist, or the pattern has another ``{...}`` field.
    """
    text = os.fspath(pattern)
    try:
        name = text.format(stem=stem)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(f"{what} {text}: expected a name with at most the field {{stem}} "
                          f"(like 'labels/{{stem}}.geojson')") from exc
    if is_remote(name):
        return name
    if not Path(name).exists():
        raise ConfigError(f"{what} {text}: {name} does not exist (for the input {stem!r}); every input needs one")
    return Path(name)
