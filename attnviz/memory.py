"""Memory estimates and the budget that keeps one request from exhausting a shared machine.

The engine estimates what a call will hold before it allocates anything, and refuses a call above the budget
with a message that says what would fit. The default budget is half of this machine's RAM (or of the GPU's memory),
capped by what is free right now; ``ATTNVIZ_MEMORY_BUDGET_GB`` overrides it for every call.
"""

from __future__ import annotations

import os
from collections.abc import Callable

import torch

from attnviz import buffers

__all__ = ["estimate_attention_bytes", "memory_budget", "check_memory", "format_bytes", "BUDGET_ENV"]

BUDGET_ENV = "ATTNVIZ_MEMORY_BUDGET_GB"
_GiB = 2**30


def format_bytes(n: float) -> str:
    for unit, size in (("GB", _GiB), ("MB", 2**20), ("KB", 2**10)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def estimate_attention_bytes(
    b: int,
    h: int,
    g: int,
    t: int,
    s: int,
    d: int,
    v: int,
    *,
    dtype: torch.dtype = torch.float32,
    score_mode: str = "scaled_dot",
    need_weights: bool = True,
    training_dropout: bool = False,
    masked: bool = True,
    need_logits: bool = True,
    tile_cells: int = 2**19,
) -> int:
    """Peak bytes of one ``attention`` call (need_weights) or ``attention_output`` call (not need_weights).

    The record holds logits and probabilities, (b, h, t, s) each, in the working precision (float32 for half
    inputs, which are then also cast back); the materialised mask is at most one byte per cell of (b, t, s) for
    batch-dependent masks; tiles and per-head tensors are small next to those. Dropout adds its random draw and
    the dropped copy. The output-only path holds no (t, s) matrix per head, only SDPA's float copy of the mask.
    """
    half = dtype in (torch.float16, torch.bfloat16)
    work = 8 if dtype == torch.float64 else 4
    cells = b * h * t * s
    per_head = (b * h * t * (d + v) + 2 * b * g * s * (d + v)) * work  # q, out, k, v and their working copies
    mask = b * t * s if masked else 0
    if not need_weights:
        return per_head + 5 * mask  # the bool mask and SDPA's float copy of it
    kept = 2 if need_logits else 1  # logits and probabilities, or probabilities only
    total = kept * cells * work + mask + per_head + 3 * min(cells, tile_cells) * work  # a tile's temporaries
    if half:
        total += kept * cells * 2  # cast back to half precision
    if training_dropout:
        total += 2 * cells * work
    if score_mode in ("concat", "additive"):
        total += 64 * 2**20  # the pairwise (tile, s, d) block of compute_logits
    return int(total)


def _meminfo_bytes(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def memory_budget(device: torch.device | str | None = None) -> int:
    """Bytes one call may use on ``device``: ATTNVIZ_MEMORY_BUDGET_GB if set, else half the device's memory,
    capped at 80% of what is free now (free buffers of attnviz.buffers count as free: they are given back first)."""
    env = os.environ.get(BUDGET_ENV)
    if env:
        try:
            value = float(env)
        except ValueError:
            raise ValueError(f"{BUDGET_ENV} must be a number of gigabytes, got {env!r}") from None
        if not value > 0:
            raise ValueError(f"{BUDGET_ENV} must be positive, got {env!r}")
        return int(value * _GiB)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        free, device_total = torch.cuda.mem_get_info(dev)
        return int(min(0.5 * device_total, 0.8 * free))
    total: int | None = _meminfo_bytes("MemTotal")
    if total is None:
        pages, page_size = os.sysconf("SC_PHYS_PAGES"), os.sysconf("SC_PAGE_SIZE")
        total = pages * page_size
    available = (_meminfo_bytes("MemAvailable") or total) + buffers.POOL.free_bytes()  # recycled, given back first
    return int(min(0.5 * total, 0.8 * available))


def _largest(fits: Callable[[int], bool], upper: int) -> int:
    """The largest n in [0, upper] with fits(n) (fits is monotone: smaller problems fit if larger ones do)."""
    lo, hi = 0, upper
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if fits(mid):
            lo = mid
        else:
            hi = mid - 1
    return lo


def check_memory(
    needed: int,
    budget: int | None,
    *,
    what: str,
    device: torch.device | str | None = None,
    shape: tuple[int, int, int, int] | None = None,
    estimator: Callable[[int, int, int, int], int] | None = None,
) -> None:
    """Raise a ValueError that says what would fit when ``needed`` exceeds the budget.

    With ``shape`` (b, h, t, s) and an ``estimator(b, h, t, s) -> bytes`` the message names the longest square
    length, the most heads and the largest batch that fit, each found by bisection on the estimator.
    """
    limit = memory_budget(device) if budget is None else int(budget)
    if needed <= limit:
        return
    advice = ""
    if shape is not None and estimator is not None:
        b, h, t, s = shape
        side = _largest(lambda n: estimator(b, h, n, n) <= limit, max(t, s))
        heads = _largest(lambda n: estimator(b, n, t, s) <= limit, h)
        batch = _largest(lambda n: estimator(n, h, t, s) <= limit, b)
        options = [f"t = s <= {side:,} at {h} heads"] if side >= 1 else []
        if heads >= 1:
            options.append(f"<= {heads} heads at this length")
        if b > 1 and batch >= 1:
            options.append(f"batch <= {batch}")
        if options:
            advice = " What fits: " + ", or ".join(options) + "."
    where = "the GPU's" if device is not None and torch.device(device).type == "cuda" else "this machine's"
    raise ValueError(
        f"{what} needs about {format_bytes(needed)} but the memory budget is {format_bytes(limit)}.{advice} "
        f"The budget is half {where} memory; set {BUDGET_ENV} to change it."
    )
