"""What prediction reads from a scene: which bands (``--bands``, the checkpoint's recorded source bands).

A checkpoint may record the scene bands its model was trained on (``meta["bands"]``: ``[{"band": index,
"description": str | None}, ...]``, written by the trainer; older checkpoints lack it). :func:`select_bands`
decides which bands of a scene the model reads:

- ``--bands 4,3,2`` (``PredictOptions.bands``) wins: those bands, in that order (a description that
  differs from the recorded one is logged, not refused: the user chose);
- else, when the checkpoint records descriptions and the scene has them, the bands are found by
  description (case-insensitive), in the model's order;
- else the recorded band indexes, else every band of the scene (but its alpha band, if that leaves the
  model's band count).

A scene that lacks a band the model needs is refused with one line naming what the scene has.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from rsseg.errors import RasterError

__all__ = ["describe_bands", "recorded_bands", "select_bands"]

log = logging.getLogger(__name__)


def describe_bands(descriptions: Sequence[str | None]) -> str:
    """``"3 bands (1 red, 2 green, 3 blue)"`` or ``"3 bands (no descriptions)"``."""
    n = len(descriptions)
    named = ", ".join(f"{i} {d}" if d else str(i) for i, d in enumerate(descriptions, start=1))
    plural = "band" if n == 1 else "bands"
    return f"{n} {plural} ({named})" if any(descriptions) else f"{n} {plural} (no descriptions)"


def recorded_bands(meta: dict[str, Any]) -> list[dict[str, Any]] | None:
    """The checkpoint's source bands as ``[{"band": int, "description": str | None}]``.

    None where the meta lacks them (older checkpoints) or they are unreadable.
    """
    bands = meta.get("bands")
    if not isinstance(bands, list) or not bands:
        return None
    try:
        return [{"band": int(b["band"]), "description": b.get("description") or None} for b in bands]
    except (TypeError, KeyError, ValueError):
        log.warning("checkpoint meta bands=%r is not a list of {band, description}: ignored", bands)
        return None


def _wanted(recorded: list[dict[str, Any]]) -> str:
    return ", ".join(f"{b['band']} {b['description']}" if b["description"] else str(b["band"]) for b in recorded)


def select_bands(src: Path, descriptions: Sequence[str | None], requested: Sequence[int] | None,
                 recorded: list[dict[str, Any]] | None, in_channels: int | None, alpha: Sequence[int] = ()
                 ) -> list[int]:
    """The 1-based band indexes of ``src`` (which has ``descriptions``, one per band) the model reads.

    ``alpha``: the scene's alpha bands, left out of the default (every band) when that leaves the model's
    band count (an RGBA PNG for an RGB model).
    """
    count, has = len(descriptions), describe_bands(descriptions)
    if requested:
        bands = list(requested)
        missing = [b for b in bands if not 1 <= b <= count]
        if missing:
            raise RasterError(f"{src} has {has}; --bands {','.join(map(str, bands))} names band(s) "
                              f"{','.join(map(str, missing))} it lacks")
        _log_differences(src, bands, descriptions, recorded)
    elif recorded is not None:
        bands = _by_description(src, descriptions, recorded)
        if bands is None:
            bands = [b["band"] for b in recorded]
            if any(not 1 <= b <= count for b in bands):
                raise RasterError(f"{src} has {has}; the model was trained on bands {_wanted(recorded)} "
                                  "(choose the scene's matching bands with --bands, e.g. --bands 1,2,3)")
    else:
        bands = list(range(1, count + 1))
        if alpha and in_channels is not None and len(bands) - len(alpha) == in_channels:
            bands = [b for b in bands if b not in alpha]
    if in_channels is not None and len(bands) != in_channels:
        how = f"--bands selects {len(bands)}" if requested else f"it has {has}"
        raise RasterError(f"{src}: {how}; the model was trained on {in_channels} band(s) "
                          "(choose them with --bands, e.g. --bands 1,2,3)")
    return bands


def _by_description(src: Path, descriptions: Sequence[str | None], recorded: list[dict[str, Any]]
                    ) -> list[int] | None:
    """Bands found by the recorded descriptions; None where either side lacks descriptions.

    Raises RasterError when the scene is described but lacks one of them.
    """
    wanted = [b["description"] for b in recorded]
    have = {d.strip().lower(): i for i, d in enumerate(descriptions, start=1) if d}
    if not all(wanted) or not have:
        return None
    found = [have.get(d.strip().lower()) for d in wanted]
    if None in found:
        lacking = [d for d, i in zip(wanted, found, strict=True) if i is None]
        raise RasterError(f"{src} has {describe_bands(descriptions)}; the model was trained on bands "
                          f"{_wanted(recorded)} and the scene lacks {', '.join(lacking)} (choose bands with "
                          "--bands, e.g. --bands 1,2,3)")
    return [i for i in found if i is not None]


def _log_differences(src: Path, bands: list[int], descriptions: Sequence[str | None],
                     recorded: list[dict[str, Any]] | None) -> None:
    if recorded is None or len(recorded) != len(bands):
        return
    for band, rec in zip(bands, recorded, strict=True):
        have = descriptions[band - 1]
        if have and rec["description"] and have.strip().lower() != rec["description"].strip().lower():
            log.warning("%s: band %d is %r where the model was trained on %r (--bands chose it)", src, band, have,
                        rec["description"])
