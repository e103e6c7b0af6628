"""AllocationTracker counts the storages operators create, until they are freed."""

import torch

from allocations import AllocationTracker


def test_counts_new_storages_and_their_peak():
    base = torch.randn(100, 10)
    with AllocationTracker() as tracker:
        a = torch.empty(1000)  # 4000 bytes
        b = base @ base.T  # 100×100 float32: 40000 bytes
        view = b[:10]  # a view: no allocation
        base.mul_(2)  # in place: no allocation
        del a
        c = torch.zeros(10)  # 40 bytes, after a was freed
    assert tracker.largest_bytes == 40_000
    assert tracker.largest_shape == (100, 100)
    assert tracker.peak_bytes == 44_000
    assert tracker.live_bytes == 40_040
    del view, b, c


def test_freed_storages_leave_the_live_count():
    with AllocationTracker() as tracker:
        for _ in range(5):
            t = torch.ones(250)
            del t
    assert tracker.peak_bytes == 1000
    assert tracker.live_bytes == 0
