"""The Tianchi building data: RLE codec, mask files and submissions, mask reports, stratified folds."""

from rsseg.tianchi.files import (
    MaskTable,
    iter_masks,
    read_masks_csv,
    score,
    validate_submission,
    write_mask_csv,
    write_submission,
)
from rsseg.tianchi.folds import FoldOptions, fold_strata, stratified_folds
from rsseg.tianchi.masks import BadRow, MaskOptions, MaskReport, describe_masks, write_mask_report
from rsseg.tianchi.rle import decode, encode, is_missing

__all__ = [
    "BadRow",
    "FoldOptions",
    "MaskOptions",
    "MaskReport",
    "MaskTable",
    "decode",
    "describe_masks",
    "encode",
    "fold_strata",
    "is_missing",
    "iter_masks",
    "read_masks_csv",
    "score",
    "stratified_folds",
    "validate_submission",
    "write_mask_csv",
    "write_mask_report",
    "write_submission",
]
