"""Recycled CPU memory for the large (b, h, t, s) tensors of an attention record.

A fresh tensor above glibc's mmap threshold (32 MB at most) is new pages from the kernel, and the first write to
each 4 KB page is a page fault that zeroes it: about 0.5 ms per MB on this project's 2-core machine, i.e. ~130 ms
of the ~0.5 s a 2048 x 2048 x 16-head probability tensor takes to compute. Smaller tensors are recycled by malloc
already; these are unmapped on free and faulted in again by the next call. This pool keeps a few of them:

- ``empty(shape, dtype)`` hands out a tensor over a pooled buffer once every tensor that viewed it is gone
  (a record the caller still holds is never reused: its buffer is found busy and a new one is made);
- the buffer is an anonymous mmap, exposed through a memoryview whose death (the last tensor or view released)
  is seen through a weak reference, so no reference counting is guessed;
- at most ``slots`` buffers are tracked, each between ``min_bytes`` and ``max_bytes``; a request of another size
  first releases the free buffers, and free buffers go back to the kernel ``idle_seconds`` (30 s) after they were
  last released (a daemon timer), so an idle process holds nothing; 30 s is longer than one t = 4096 call on a
  loaded 2-core machine (5 s was not: a loop alternating with another 5 s computation lost its buffer each time);
- ``release()`` gives every free buffer back now.

The values are untouched: a recycled buffer is overwritten completely by the caller (``torch.empty`` semantics).
"""

from __future__ import annotations

import math
import mmap
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["BufferPool", "POOL", "empty", "release", "POOL_ENV"]

POOL_ENV = "ATTNVIZ_BUFFER_POOL"  # "0" turns the pool off (every request is a plain torch.empty)


def _never_used() -> None:
    return None


@dataclass
class _Slot:
    buffer: mmap.mmap
    view: Callable[[], object]  # weak reference to the memoryview the tensors hold; None back = free


class BufferPool:
    """A few large CPU buffers, reused once every tensor over them is gone (see the module docstring)."""

    def __init__(self, slots: int = 2, min_bytes: int = 32 * 2**20, max_bytes: int = 2**30, idle_seconds: float = 30.0):
        self.slots = int(slots)
        self.min_bytes = int(min_bytes)
        self.max_bytes = int(max_bytes)
        self.idle_seconds = float(idle_seconds)
        self._slots: list[_Slot] = []
        self._lock = threading.RLock()  # reentrant: a weakref callback may run while this thread holds it
        self._timer: threading.Timer | None = None
        self.reused = 0  # requests served from a pooled buffer (for tests and benchmarks)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        """An uninitialised CPU tensor of ``shape`` and ``dtype``, over a recycled buffer where one is free."""
        count = math.prod(shape)
        nbytes = count * torch.empty((), dtype=dtype).element_size()
        if self.slots <= 0 or not self.min_bytes <= nbytes <= self.max_bytes or os.environ.get(POOL_ENV) == "0":
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            slot = next((x for x in self._slots if x.view() is None and len(x.buffer) == nbytes), None)
            if slot is not None:
                self.reused += 1
            else:
                self._close_free()  # a request of another size: give the free memory back before taking more
                if len(self._slots) >= self.slots:  # every slot busy: an ordinary tensor, not tracked
                    return torch.empty(shape, dtype=dtype)
                slot = _Slot(mmap.mmap(-1, nbytes), _never_used)
                self._slots.append(slot)
            view = memoryview(slot.buffer)
            slot.view = weakref.ref(view, self._freed)
            return torch.frombuffer(view, dtype=dtype, count=count).view(shape)

    def release(self) -> None:
        """Give every free buffer back to the kernel now (busy ones stay with the tensors that use them)."""
        with self._lock:
            self._close_free()

    def free_bytes(self) -> int:
        """Bytes held in free buffers: memory a request of another size gives back before it allocates."""
        with self._lock:
            return sum(len(x.buffer) for x in self._slots if x.view() is None)

    def _close_free(self) -> None:
        free = [x for x in self._slots if x.view() is None]
        self._slots = [x for x in self._slots if x.view() is not None]
        for x in free:
            x.buffer.close()

    def _freed(self, _ref) -> None:
        """The last tensor over a buffer is gone: release the free buffers after ``idle_seconds`` unless reused."""
        with self._lock:
            if self._timer is not None:
                self._timer.cancel()
            self._timer = threading.Timer(self.idle_seconds, self.release)
            self._timer.daemon = True
            self._timer.start()

    def __len__(self) -> int:
        return len(self._slots)


POOL = BufferPool()


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """``POOL.empty``: a CPU tensor over a recycled buffer where one is free (plain ``torch.empty`` otherwise)."""
    return POOL.empty(shape, dtype)


def release() -> None:
    """Give the pool's free buffers back to the kernel now."""
    POOL.release()
