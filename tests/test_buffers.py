"""attnviz.buffers: large CPU buffers are recycled only once every tensor over them is gone, bounded, and given
back when idle; the engine's records never share memory with a record the caller still holds."""

from __future__ import annotations

import gc
import time

import pytest
import torch

from attnviz import buffers
from attnviz import masks as M
from attnviz.engine import attention


def test_reuse_only_after_every_view_is_gone():
    pool = buffers.BufferPool(slots=2, min_bytes=1)
    a = pool.empty((4, 8), torch.float32)
    first_ptr = a.data_ptr()
    a.fill_(1.0)
    view = a[1:3]  # a view keeps the buffer busy
    del a
    b = pool.empty((4, 8), torch.float32)
    assert b.data_ptr() != first_ptr and pool.reused == 0
    b.fill_(2.0)
    assert bool((view == 1.0).all())  # untouched by the second tensor
    del view
    gc.collect()
    c = pool.empty((32,), torch.float32)  # same bytes, any shape
    assert pool.reused == 1 and c.data_ptr() == first_ptr and c.shape == (32,)


def test_bounds_sizes_and_slots():
    pool = buffers.BufferPool(slots=1, min_bytes=64, max_bytes=1024)
    small = pool.empty((4,), torch.float32)  # 16 bytes: below min_bytes, a plain tensor
    large = pool.empty((512,), torch.float32)  # 2048 bytes: above max_bytes
    assert len(pool) == 0 and small.shape == (4,) and large.shape == (512,)
    a = pool.empty((32,), torch.float32)
    b = pool.empty((32,), torch.float32)  # the one slot is busy: not tracked
    assert len(pool) == 1 and a.data_ptr() != b.data_ptr()
    del a
    c = pool.empty((64,), torch.float32)  # another size: the free slot is given back first
    assert len(pool) == 1 and pool.reused == 0 and c.numel() == 64


def test_release_and_idle_timer():
    pool = buffers.BufferPool(slots=2, min_bytes=1, idle_seconds=0.05)
    a = pool.empty((16,), torch.float64)
    kept = pool.empty((8,), torch.float64)
    del a
    deadline = time.monotonic() + 5
    while len(pool) > 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(pool) == 1  # the free one went back to the kernel, the busy one stays
    kept.fill_(3.0)
    del kept
    pool.release()
    assert len(pool) == 0


def test_switched_off_by_environment(monkeypatch):
    pool = buffers.BufferPool(slots=2, min_bytes=1)
    monkeypatch.setenv(buffers.POOL_ENV, "0")
    pool.empty((16,), torch.float32)
    assert len(pool) == 0


@pytest.mark.parametrize("need_logits", [True, False])
def test_records_never_share_memory_with_held_ones(monkeypatch, need_logits):
    pool = buffers.BufferPool(slots=2, min_bytes=1)
    monkeypatch.setattr(buffers, "POOL", pool)
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(1, 2, 6, 4, generator=g) for _ in range(3))
    first = attention(q, k, v, mask=M.causal(), need_logits=need_logits)
    expected = first.scores.clone()
    second = attention(q * 2, k, v, mask=M.causal(), need_logits=need_logits)  # first is held: fresh memory
    assert pool.reused == 0 and second.scores.data_ptr() != first.scores.data_ptr()
    torch.testing.assert_close(first.scores, expected)  # untouched
    ptr = first.scores.data_ptr()
    del first
    gc.collect()
    third = attention(q, k, v, mask=M.causal(), need_logits=need_logits)
    assert pool.reused >= 1 and ptr in (
        third.scores.data_ptr(),
        *(() if third.logits is None else (third.logits.data_ptr(),)),
    )
    torch.testing.assert_close(third.scores, expected)


def test_threads_never_get_the_same_live_buffer():
    """Streamlit runs sessions in threads: a buffer is handed to one live tensor at a time."""
    import threading

    pool = buffers.BufferPool(slots=2, min_bytes=1)
    errors: list[str] = []

    def work(seed: int) -> None:
        for i in range(200):
            x = pool.empty((64,), torch.float32)
            x.fill_(float(seed))
            if i % 7 == 0:
                time.sleep(0.0005)
            if not bool((x == float(seed)).all()):
                errors.append(f"thread {seed} saw another thread's values")
            del x

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors and pool.reused > 0 and len(pool) <= 2
