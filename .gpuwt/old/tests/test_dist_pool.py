"""The shared test pool itself: results in rank order, rank tracebacks re-raised, timeouts kill (never hang)."""

from __future__ import annotations

import time

import pytest
import torch
import torch.distributed as dist

from tests.dist_pool import DistPool, DistTaskError


def _rank_info(offset: int, scale: float = 1.0) -> tuple:
    x = torch.tensor([float(dist.get_rank() + offset)])
    dist.all_reduce(x)
    return dist.get_rank(), x.item() * scale, torch.get_num_threads()


def _fail_on_rank_1() -> None:
    if dist.get_rank() == 1:
        raise ValueError("deliberate failure on rank one")
    dist.barrier()  # rank 0 is left waiting in a collective: the pool must not hang on it


def _sleep(seconds: float) -> None:
    time.sleep(seconds)


def test_pool_results_errors_and_timeouts():
    with DistPool(2, timeout=30) as pool:
        assert pool.run(_rank_info, 10, scale=2.0) == [(0, 42.0, 1), (1, 42.0, 1)]
        with pytest.raises(DistTaskError, match=r"(?s)rank 1 ---.*_fail_on_rank_1.*deliberate failure on rank one") as info:
            pool.run(_fail_on_rank_1)
        assert "ranks [0] did not finish" in str(info.value)
        with pytest.raises(DistTaskError, match="module level"):
            pool.run(lambda: None)  # refused before anything is sent
        # The killed pool restarts on the next run (the message names the task, not start-up) and is killed again.
        with pytest.raises(DistTaskError, match=r"(?s)task _sleep failed.*ranks \[0, 1\] timed out after 1 s"):
            pool.run(_sleep, 60, timeout=1)
