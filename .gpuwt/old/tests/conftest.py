"""Shared fixtures: session-scoped gloo worker pools (see tests/dist_pool.py).

Each pool is spawned the first time a test asks for it and shut down at the end of the session, so a test run
pays for at most one spawn per pool size. Use them from test modules as::

    from tests.dist_pool import model_parallel

    def _task():                              # module level: workers import it by name
        with model_parallel(tensor_model_parallel_size=2) as ps:
            return ps.get_tensor_model_parallel_rank()

    def test_tp_rank(dist_pool_2):
        assert dist_pool_2.run(_task) == [0, 1]
"""

from __future__ import annotations

import os
import sys
from typing import Iterator

import pytest

_TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
# Both ``tests.dist_pool`` and plain ``dist_pool`` resolve (workers see the same paths via dist_pool itself).
for _path in (os.path.dirname(_TESTS_DIR), _TESTS_DIR):
    if _path not in sys.path:
        sys.path.insert(0, _path)

from tests.dist_pool import DistPool  # noqa: E402


def _pool(world_size: int) -> Iterator[DistPool]:
    pool = DistPool(world_size)
    try:
        yield pool
    finally:
        pool.shutdown()


@pytest.fixture(scope="session")
def dist_pool_1() -> Iterator[DistPool]:
    yield from _pool(1)


@pytest.fixture(scope="session")
def dist_pool_2() -> Iterator[DistPool]:
    yield from _pool(2)


@pytest.fixture(scope="session")
def dist_pool_3() -> Iterator[DistPool]:
    yield from _pool(3)


@pytest.fixture(scope="session")
def dist_pool_4() -> Iterator[DistPool]:
    yield from _pool(4)


@pytest.fixture(scope="session")
def dist_pool_8() -> Iterator[DistPool]:
    yield from _pool(8)


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """SmolLM2-135M-Instruct as a Hugging Face checkpoint directory (``python -m megacp.models.prepare smollm2``):
    converted once into the user cache (``$MEGACP_CACHE``, default ``~/.cache/megacp``), reused afterwards."""
    from megacp.models.prepare import prepare

    try:
        return prepare("smollm2")
    except ImportError as e:  # scripts/venv.sh installs it; elsewhere the real-weight tests are skipped
        pytest.skip(f"the packaged SmolLM2 is not available: {e}")
