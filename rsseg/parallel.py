"""Blocks of a stage run in this process or on any ``concurrent.futures.Executor``.

A stage's parallel part is a per-block function; :func:`map_blocks` runs it over the blocks, in this process
when no executor is given, else on the executor (a process pool, or a Dask client's ``get_executor()``: the
library never imports Dask). Results come back as blocks complete; on the first failure the blocks not yet
started are cancelled and the error is raised.
"""

from __future__ import annotations

import concurrent.futures as cf
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

from tqdm.auto import tqdm

__all__ = ["map_blocks"]

T = TypeVar("T")
R = TypeVar("R")


def map_blocks(
    fn: Callable[[T], R], blocks: Sequence[T], executor: cf.Executor | None = None, *, desc: str | None = None
) -> Iterator[tuple[int, R]]:
    """Yield ``(i, fn(blocks[i]))`` for every block, in the order the blocks complete.

    Args:
        fn: the per-block function (picklable when the executor runs it in other processes).
        blocks: its arguments, one per block.
        executor: where to run the blocks; None runs them here, one after another.
        desc: a progress bar with this label (shown on a terminal only).
    """
    bar = tqdm(total=len(blocks), desc=desc, disable=None if desc else True, leave=False)
    try:
        if executor is None:
            for i, block in enumerate(blocks):
                yield i, fn(block)
                bar.update()
            return
        futures = {executor.submit(fn, block): i for i, block in enumerate(blocks)}
        try:
            for future in cf.as_completed(futures):
                yield futures[future], future.result()
                bar.update()
        finally:
            for future in futures:
                future.cancel()
    finally:
        bar.close()
