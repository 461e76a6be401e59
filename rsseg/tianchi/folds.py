"""Stratified K-fold splits of the Tianchi training images by emptiness and building fraction.

Every image gets one stratum: images without building form stratum 0; the others are cut into ``bins``
quantile bins of building fraction (strata 1..bins, by rank, so ties cannot empty a bin). Within each
stratum the images are shuffled (by ``seed``) and dealt to the folds in turn, the deal continuing from one
stratum to the next: each fold then holds the same number of images of every stratum, give or take one,
and the folds' sizes differ by at most one.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
import pandas as pd
from pydantic import Field

from rsseg.errors import ConfigError, DatasetError
from rsseg.options import Options, resolve

__all__ = ["FoldOptions", "fold_strata", "stratified_folds"]


class FoldOptions(Options):
    """How :func:`stratified_folds` splits images (``data.folds``, ``data.stratify`` in a pipeline)."""

    folds: int = Field(5, ge=2, description="Number of folds (K of K-fold cross-validation).")
    stratify: Literal["building_fraction", "none"] = Field(
        "building_fraction", description="building_fraction: the same share of empty images and of each "
        "building-fraction bin in every fold; none: a shuffled split of balanced sizes.")
    bins: int = Field(4, ge=1, description="Quantile bins of building fraction among non-empty images.")
    seed: int = Field(0, description="Random seed of the shuffle within each stratum.")


def fold_strata(table: pd.DataFrame, bins: int = 4) -> pd.Series:
    """Each image's stratum: 0 if it has no building, else its quantile bin 1..``bins`` of building fraction.

    Args:
        table: a per-image table with ``name``, ``building_fraction`` and ``empty`` columns
            (:attr:`rsseg.tianchi.MaskReport.table`).
        bins: the number of quantile bins of the non-empty images.

    Returns:
        An int64 series indexed by image name.
    """
    _check_table(table)
    fraction = table["building_fraction"].to_numpy(float)
    empty = table["empty"].to_numpy(bool) | (fraction <= 0)
    strata = np.zeros(len(table), dtype=np.int64)
    n_full = int((~empty).sum())
    if n_full:
        # Rank (ties broken by name, the table is sorted so) then cut into equal-count bins 1..bins.
        ranks = pd.Series(fraction[~empty]).rank(method="first").to_numpy() - 1
        strata[~empty] = 1 + (ranks * bins // n_full).astype(np.int64)
    return pd.Series(strata, index=pd.Index(table["name"], name="name"), name="stratum")


def stratified_folds(table: pd.DataFrame, options: FoldOptions | None = None, **values: Any) -> pd.Series:
    """Assign every image to exactly one of ``folds`` folds, with the same distribution in each fold.

    The result depends only on the set of images (not the table's row order), the options and ``seed``.

    Args:
        table: a per-image table with ``name``, ``building_fraction`` and ``empty`` columns
            (:attr:`rsseg.tianchi.MaskReport.table`, or ``masks.csv`` read back with pandas).
        options: a :class:`FoldOptions`; None for the defaults.
        **values: fields of the options to override, e.g. ``stratified_folds(table, folds=5, seed=1)``.

    Returns:
        The fold (0..folds-1) of each image, an int64 series indexed by image name in the table's order.

    Raises:
        ConfigError: an unknown option, or more folds than images.
        DatasetError: the table lacks a column or names an image twice.
    """
    opts = resolve(FoldOptions, options, values)
    _check_table(table)
    if opts.folds > len(table):
        raise ConfigError(f"folds={opts.folds} but the table has {len(table)} images; "
                          "use at most one fold per image")
    ordered = table.sort_values("name", kind="stable")
    if opts.stratify == "none":
        strata = pd.Series(0, index=pd.Index(ordered["name"], name="name"))
    else:
        strata = fold_strata(ordered, opts.bins)
    rng = np.random.default_rng(opts.seed)
    groups = [strata.index[strata.to_numpy() == stratum].to_numpy() for stratum in sorted(strata.unique())]
    dealt = np.concatenate([names[rng.permutation(names.size)] for names in groups])  # stratum after stratum
    folds = pd.Series(np.arange(dealt.size) % opts.folds, index=pd.Index(dealt, name="name"), name="fold")
    return folds.reindex(pd.Index(table["name"], name="name"))


def _check_table(table: pd.DataFrame) -> None:
    missing = [c for c in ("name", "building_fraction", "empty") if c not in table.columns]
    if missing:
        raise DatasetError(f"the image table lacks the column(s) {missing}; expected the table of "
                           "describe_masks() (name, building_fraction, empty, ...)")
    if table["name"].duplicated().any():
        dup = table["name"][table["name"].duplicated()].iloc[0]
        raise DatasetError(f"the image table names {dup} more than once; expected one row per image")
