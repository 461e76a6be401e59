"""Stage fingerprints: what a stage's result depends on, so that a re-run skips only what did not change.

A stage's fingerprint hashes its kind, its parameters, every external input file it names (a file, each
file of a folder, each file a glob or a ``{stem}`` pattern matches), the fingerprints of the stages it
uses, and a hash of rsseg's own source files: a changed input, parameter or code re-runs the stage and
every stage after it.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
from pathlib import Path
from typing import Any

from rsseg.fileio import file_sha256

__all__ = ["completed", "fingerprints", "input_files", "source_hash"]

#: Files larger than this are fingerprinted by size, mtime and their first and last 16 MiB.
FULL_HASH_LIMIT = 256 << 20
_GLOB_CHARS = frozenset("*?[")


@functools.cache
def source_hash() -> str:
    """SHA-256 of rsseg's Python sources (relative path and content of each ``rsseg/**/*.py``)."""
    package = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(f"{path.relative_to(package).as_posix()}\0".encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()


def _describe_file(path: Path) -> dict[str, Any]:
    """Size and content hash of one file (sampled for files over :data:`FULL_HASH_LIMIT`)."""
    st = path.stat()
    if st.st_size <= FULL_HASH_LIMIT:
        return {"path": str(path), "size": st.st_size, "sha256": file_sha256(path)}
    digest = hashlib.sha256(f"{st.st_size}\0{st.st_mtime_ns}".encode())
    with open(path, "rb") as fh:
        digest.update(fh.read(16 << 20))
        fh.seek(-16 << 20, os.SEEK_END)
        digest.update(fh.read())
    return {"path": str(path), "size": st.st_size, "sampled_sha256": digest.hexdigest()}


def _describe_folder(path: Path) -> dict[str, Any]:
    """A folder: its files' relative names, sizes and mtimes (hashing every file of a big folder is too slow)."""
    digest = hashlib.sha256()
    total = 0
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        st = f.stat()
        total += st.st_size
        digest.update(f"{f.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return {"path": str(path), "size": total, "listing_sha256": digest.hexdigest()}


def input_files(spec: str, workdir: Path) -> list[Path]:
    """The existing paths outside ``workdir`` that one parameter value names.

    A plain path names itself; a glob (``*``, ``?``, ``[``) names every match; a pattern with ``{stem}``
    names every file it matches with ``{stem}`` read as ``*``. Paths under ``workdir`` are stage outputs,
    covered by the fingerprints of the stages that write them.
    """
    if not spec or "\n" in spec or len(spec) > 4096:
        return []
    pattern = spec.replace("{stem}", "*")
    if _GLOB_CHARS.isdisjoint(pattern):
        candidates = [Path(pattern).expanduser()]
    else:
        candidates = [Path(p) for p in sorted(glob.glob(os.path.expanduser(pattern)))]
    return [p.absolute() for p in candidates if p.exists() and not p.absolute().is_relative_to(workdir)]


def _external_inputs(params: Any, workdir: Path) -> list[Path]:
    """Every external input named anywhere in a stage's parameters."""
    if isinstance(params, dict):
        return [p for v in params.values() for p in _external_inputs(v, workdir)]
    if isinstance(params, list):
        return [p for v in params for p in _external_inputs(v, workdir)]
    if isinstance(params, str):
        return input_files(params, workdir)
    return []


def fingerprints(pipe: Any) -> dict[str, dict[str, Any]]:
    """Each stage's manifest header: kind, parameters, inputs, needs, rsseg source hash and fingerprint."""
    out: dict[str, dict[str, Any]] = {}
    for st in pipe.stages:
        params = st.params.model_dump(mode="json")
        inputs = [_describe_folder(p) if p.is_dir() else _describe_file(p)
                  for p in _external_inputs(params, pipe.workdir)]
        head = {"stage": st.name, "uses": st.uses, "params": params, "inputs": inputs,
                "needs": {d: out[d]["fingerprint"] for d in st.needs}, "rsseg_sources": source_hash()}
        head["fingerprint"] = hashlib.sha256(json.dumps(head, sort_keys=True).encode()).hexdigest()
        out[st.name] = head
    return out


def completed(stage_dir: Path, fingerprint: str) -> dict[str, Any] | None:
    """The manifest of a finished stage in ``stage_dir`` if its fingerprint is ``fingerprint``, else None."""
    try:
        found = json.loads((stage_dir / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    return found if found.get("fingerprint") == fingerprint else None
