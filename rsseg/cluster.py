"""Where Dask work runs: the current client, a scheduler address, or a LocalCluster of our own."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from distributed import Client, LocalCluster, default_client

__all__ = ["dask_client"]

log = logging.getLogger(__name__)


def _current_client() -> Client | None:
    try:
        return default_client()
    except ValueError:
        return None


@contextlib.contextmanager
def dask_client(scheduler: str | Client | None = None, n_workers: int | None = None) -> Iterator[Client]:
    """Yield a Dask client, closing only what this call started.

    Args:
        scheduler: a :class:`distributed.Client` to use as is, a scheduler address (``tcp://host:8786``),
            or None: the client already current in this process if there is one, else a new
            :class:`~distributed.LocalCluster` of single-threaded worker processes.
        n_workers: workers of a new LocalCluster (default: the number of CPUs).
    """
    if isinstance(scheduler, Client):
        yield scheduler
        return
    if scheduler:
        with Client(scheduler) as client:
            log.info("connected to Dask scheduler %s (dashboard %s)", scheduler, client.dashboard_link)
            yield client
        return
    current = _current_client()
    if current is not None:
        yield current
        return
    workers = n_workers or os.cpu_count() or 1
    with (
        LocalCluster(n_workers=workers, threads_per_worker=1, processes=True, dashboard_address=":0") as cluster,
        Client(cluster) as client,
    ):
        log.info("started a LocalCluster of %d workers (dashboard %s)", workers, client.dashboard_link)
        yield client
