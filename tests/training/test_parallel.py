"""Putting per-process rows together (what the GIST match and embed stages do in multi-process jobs),
with two processes simulated by a fake all-gather."""

import numpy as np
import pytest
from jax.experimental import multihost_utils

from jaxgist.training import parallel


def test_one_process_gets_its_rows_back():
    values, filled = np.arange(6).reshape(3, 2), np.array([True, False, True])
    got, got_filled = parallel.combine_rows(values, filled)
    np.testing.assert_array_equal(got, values)
    np.testing.assert_array_equal(got_filled, filled)


def test_rows_of_two_processes_are_combined(monkeypatch):
    """Process 0 filled rows 0 and 2 (strided shard), process 1 rows 1 and 3; row 4 nobody (skipped)."""
    n = 5
    mine = np.zeros((n, 2), np.float32)
    mine[[0, 2]] = [[1, 1], [3, 3]]
    peer = np.full((n, 2), -7.0, np.float32)  # rows a process did not fill hold anything
    peer[[1, 3]] = [[2, 2], [4, 4]]
    filled_mine = np.array([True, False, True, False, False])
    filled_peer = np.array([False, True, False, True, False])
    peers = {id(mine): peer, id(filled_mine): filled_peer}
    monkeypatch.setattr(parallel.jax, "process_count", lambda: 2)
    monkeypatch.setattr(multihost_utils, "process_allgather", lambda x: np.stack([x, peers[id(x)]]))
    values, filled = parallel.combine_rows(mine, filled_mine)
    np.testing.assert_array_equal(values[:4], [[1, 1], [2, 2], [3, 3], [4, 4]])
    np.testing.assert_array_equal(filled, [True, True, True, True, False])


def test_sync_is_a_no_op_in_one_process(monkeypatch):
    monkeypatch.setattr(multihost_utils, "sync_global_devices", lambda name: pytest.fail("synced in one process"))
    parallel.sync("test")
