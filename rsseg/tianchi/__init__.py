"""The Tianchi building data: the RLE codec, ``train_mask.csv`` and submissions, validation, the score."""

from rsseg.tianchi.files import (
    MaskTable,
    iter_masks,
    read_masks_csv,
    score,
    validate_submission,
    write_mask_csv,
    write_submission,
)
from rsseg.tianchi.rle import decode, encode, is_missing

__all__ = [
    "MaskTable",
    "decode",
    "encode",
    "is_missing",
    "iter_masks",
    "read_masks_csv",
    "score",
    "validate_submission",
    "write_mask_csv",
    "write_submission",
]
