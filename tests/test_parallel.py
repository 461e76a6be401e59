"""Blocks run in-process, on a thread pool and on a real Dask client's executor, with the same results."""

import concurrent.futures as cf

import pytest
from distributed import Client, LocalCluster

from rsseg.parallel import map_blocks


def _square(x: int) -> int:
    if x < 0:
        raise ValueError(f"block {x} is negative")
    return x * x


def test_in_process_and_thread_pool():
    assert sorted(map_blocks(_square, [1, 2, 3])) == [(0, 1), (1, 4), (2, 9)]
    with cf.ThreadPoolExecutor(2) as pool:
        assert sorted(map_blocks(_square, [1, 2, 3], pool)) == [(0, 1), (1, 4), (2, 9)]


def test_dask_executor_and_failure():
    with LocalCluster(n_workers=1, threads_per_worker=2, processes=False, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        executor = client.get_executor()
        assert sorted(map_blocks(_square, list(range(10)), executor)) == [(i, i * i) for i in range(10)]
        with pytest.raises(ValueError, match="block -1 is negative"):
            list(map_blocks(_square, [1, -1, 2], executor))
    with pytest.raises(ValueError, match="block -1"):
        list(map_blocks(_square, [1, -1, 2]))
