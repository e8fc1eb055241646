"""Framework comparison: the real torch, SDPA, Keras and d2l implementations on the same inputs and mask."""

from __future__ import annotations

import math
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import Tensor

from attnviz.engine import MASKED_ROW_POLICIES, AttentionResult, attention
from attnviz.pagemodels.masklab.formula import fully_masked

# ---------------------------------------------------------------------------------------------------------
# Framework comparison: the real implementations on the same inputs and mask
# ---------------------------------------------------------------------------------------------------------

COMPARE_MAX = 64  # framework comparison: t, s <= 64 ...
COMPARE_MAX_ROWS = 32  # ... and b · h <= 32 query-row grids


def d2l_masked_softmax(X: Tensor, valid_lens: Tensor | None) -> Tensor:
    """d2l's ``masked_softmax`` (Dive into Deep Learning, section 11.3 "Attention Scoring Functions"),
    reproduced line for line: masked scores are *replaced* by -1e6, so a valid length of 0 gives a uniform row.

    X: (batch, queries, keys) scores; valid_lens: (batch,) or (batch, queries). X is modified in place, as in d2l.
    """

    def _sequence_mask(X, valid_len, value=0):
        maxlen = X.size(1)
        mask = torch.arange((maxlen), dtype=torch.float32, device=X.device)[None, :] < valid_len[:, None]
        X[~mask] = value
        return X

    if valid_lens is None:
        return torch.nn.functional.softmax(X, dim=-1)
    shape = X.shape
    if valid_lens.dim() == 1:
        valid_lens = torch.repeat_interleave(valid_lens, shape[1])
    else:
        valid_lens = valid_lens.reshape(-1)
    # On the last axis, replace masked elements with a very large negative value, whose exponentiation outputs 0
    X = _sequence_mask(X.reshape(-1, shape[-1]), valid_lens, value=-1e6)
    return torch.nn.functional.softmax(X.reshape(shape), dim=-1)


@dataclass(frozen=True)
class FrameworkRun:
    """One real implementation's answer on the comparison inputs, per head in the (b, h, t, ·) layout."""

    name: str  # e.g. "torch MultiheadAttention (need_weights=True)"
    call: str  # how it was called
    output: Tensor | None  # (b, h, t, d) per-head output (None when it could not run)
    probs: Tensor | None  # (b, h, t, s) probabilities, when the path returns them
    note: str = ""  # caveats: what mask it saw, why it did not run
    mask_applied: bool = True  # False for SDPA is_causal, which builds its own (top-left causal) mask

    @property
    def short(self) -> str:
        """A column header for the per-row table."""
        return SHORT_NAMES.get(self.name, self.name)


@dataclass(frozen=True)
class Comparison:
    """The comparison's inputs, each framework's run, a summary per framework and a table per query row."""

    query: Tensor  # (b, h, t, d)
    key: Tensor  # (b, h, s, d)
    value: Tensor  # (b, h, s, d)
    keep: Tensor  # (b, h, t, s) bool
    runs: tuple[FrameworkRun, ...]
    summary: pd.DataFrame  # one row per framework
    rows: pd.DataFrame  # long: one row per (framework, batch, head, query)
    versions: str  # "torch 2.13.0, keras 3.15.1"


SHORT_NAMES = {
    "torch MultiheadAttention (need_weights=True)": "torch MHA weights",
    "torch MultiheadAttention (need_weights=False)": "torch MHA no weights",
    "SDPA (bool mask)": "SDPA bool",
    "SDPA (additive 0/−inf mask)": "SDPA additive",
    "SDPA (is_causal=True)": "SDPA is_causal",
    "Keras MultiHeadAttention (return_attention_scores=True)": "Keras with scores",
    "Keras MultiHeadAttention (fused, no scores)": "Keras fused",
    "d2l masked_softmax (−1e6)": "d2l",
    "attnviz masked_rows='zeros'": "attnviz zeros",
    "attnviz masked_rows='uniform'": "attnviz uniform",
    "attnviz masked_rows='nan'": "attnviz nan",
}


def _keras():
    """Keras, imported lazily on the torch backend (set before the import), or (None, reason)."""
    os.environ.setdefault("KERAS_BACKEND", "torch")
    try:
        import keras
    except ImportError:
        return None, "Keras not installed (pip install 'keras>=3.10' to compare it)"
    except Exception as err:  # a broken backend install: report, don't crash the page
        return None, f"Keras could not be imported: {type(err).__name__}: {err}"
    return keras, ""


def _tokens(x: Tensor) -> Tensor:
    """(b, h, n, d) per-head -> (b, n, h·d) tokens, head-major features (what an identity projection splits)."""
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


def _heads(x: Tensor, h: int) -> Tensor:
    """(b, n, h·d) -> (b, h, n, d)."""
    b, n, e = x.shape
    return x.reshape(b, n, h, e // h).transpose(1, 2)


def _run_torch_mha(q, k, v, keep, need_weights: bool) -> FrameworkRun:
    b, h, t, d = q.shape
    e = h * d
    mha = torch.nn.MultiheadAttention(e, h, bias=False, batch_first=True)
    with torch.no_grad():  # identity projections: every framework sees the same per-head q, k, v
        mha.in_proj_weight.copy_(torch.eye(e).repeat(3, 1))
        mha.out_proj.weight.copy_(torch.eye(e))
        attn_mask = ~keep.reshape(b * h, t, keep.shape[-1])  # (b·h, t, s), torch: True = masked
        out, weights = mha(
            _tokens(q),
            _tokens(k),
            _tokens(v),
            attn_mask=attn_mask,
            need_weights=need_weights,
            average_attn_weights=False,
        )
    return FrameworkRun(
        name=f"torch MultiheadAttention (need_weights={need_weights})",
        call=f"mha(q, k, v, attn_mask=~keep.reshape(b*h, t, s), need_weights={need_weights})",
        output=_heads(out, h),
        probs=weights if need_weights else None,
        note="identity in/out projections, no bias; torch reads True = masked, so the keep-mask is inverted",
    )


def _run_sdpa(q, k, v, keep, kind: str) -> FrameworkRun:
    F = torch.nn.functional
    if kind == "bool":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=keep)
        return FrameworkRun(
            "SDPA (bool mask)",
            "F.scaled_dot_product_attention(q, k, v, attn_mask=keep)",
            out,
            None,
            "True = may attend",
        )
    if kind == "additive":
        bias = torch.zeros(keep.shape).masked_fill(~keep, float("-inf"))  # (b, h, t, s) 0 / -inf
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return FrameworkRun(
            "SDPA (additive 0/−inf mask)",
            "F.scaled_dot_product_attention(q, k, v, attn_mask=zeros.masked_fill(~keep, -inf))",
            out,
            None,
            "float mask added to the scores",
        )
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return FrameworkRun(
        "SDPA (is_causal=True)",
        "F.scaled_dot_product_attention(q, k, v, is_causal=True)",
        out,
        None,
        "no attn_mask: is_causal builds its own top-left causal mask (j <= i), whatever your mask is",
        mask_applied=False,
    )


def _run_keras(q, k, v, keep, with_scores: bool) -> FrameworkRun:
    name = f"Keras MultiHeadAttention ({'return_attention_scores=True' if with_scores else 'fused, no scores'})"
    call = f"layer(query, value, key=key, attention_mask=keep[:, head], return_attention_scores={with_scores})"
    keras, why = _keras()
    if keras is None:
        return FrameworkRun(name, call, None, None, why)
    b, h, t, d = q.shape
    # Keras' attention_mask is (b, t, s), one mask for every head: run one single-head layer per head when
    # the mask differs between heads.
    per_head = not bool((keep == keep[:, :1]).all())
    groups = [(u, u + 1) for u in range(h)] if per_head else [(0, h)]
    outs, scores = [], []
    for lo, hi in groups:
        n = hi - lo
        layer = keras.layers.MultiHeadAttention(num_heads=n, key_dim=d, use_bias=False)
        xq, xk, xv = (_tokens(x[:, lo:hi]).numpy() for x in (q, k, v))
        layer(xq, xv, key=xk)  # build
        eye = np.eye(n * d, dtype="float32")
        for dense in (layer._query_dense, layer._key_dense, layer._value_dense):
            dense.set_weights([eye.reshape(n * d, n, d)])
        layer._output_dense.set_weights([eye.reshape(n, d, n * d)])
        mask = keep[:, lo].numpy()  # (b, t, s) True = may attend
        result = layer(xq, xv, key=xk, attention_mask=mask, return_attention_scores=with_scores)
        out = result[0] if with_scores else result
        outs.append(_heads(torch.from_numpy(np.asarray(keras.ops.convert_to_numpy(out))), n))
        if with_scores:
            scores.append(torch.from_numpy(np.asarray(keras.ops.convert_to_numpy(result[1]))))
    note = f"Keras {keras.__version__} on the {keras.backend.backend()} backend, identity kernels, no bias"
    if per_head:
        note += "; the mask differs per head, so each head ran as its own 1-head layer"
    return FrameworkRun(name, call, torch.cat(outs, dim=1), torch.cat(scores, dim=1) if with_scores else None, note)


def _prefix_lengths(keep: Tensor) -> Tensor | None:
    """(b, h, t) valid lengths when every row keeps exactly a prefix of keys (a d2l valid_lens mask), else None."""
    lens = keep.sum(-1)  # (b, h, t)
    prefix = torch.arange(keep.shape[-1]) < lens[..., None]
    return lens if torch.equal(prefix, keep) else None


def _run_d2l(q, k, v, keep) -> FrameworkRun:
    b, h, t, d = q.shape
    s = k.shape[2]
    scores = torch.bmm(q.reshape(b * h, t, d), k.reshape(b * h, s, d).transpose(1, 2)) / math.sqrt(d)
    lens = _prefix_lengths(keep)
    if lens is not None:
        probs = d2l_masked_softmax(scores.clone(), lens.reshape(b * h, t))
        call, note = "masked_softmax(scores, valid_lens)  # 2-D valid_lens (b·h, t)", "your mask is a valid_lens mask"
    else:
        # d2l can only express prefix masks; apply its rule (replace masked scores by -1e6) to this mask.
        probs = torch.softmax(scores.masked_fill(~keep.reshape(b * h, t, s), -1e6), dim=-1)
        call = "softmax(scores.masked_fill(~keep, -1e6))"
        note = "not a valid_lens (prefix) mask, so d2l's rule (masked scores := -1e6) is applied to it directly"
    out = torch.bmm(probs, v.reshape(b * h, s, d)).reshape(b, h, t, d)
    return FrameworkRun("d2l masked_softmax (−1e6)", call, out, probs.reshape(b, h, t, s), note)


def _run_attnviz(q, k, v, keep, policy: str) -> tuple[FrameworkRun, AttentionResult]:
    rec = attention(q, k, v, mask=keep, masked_rows=policy)
    return FrameworkRun(
        f"attnviz masked_rows='{policy}'",
        f"attnviz.attention(q, k, v, mask=keep, masked_rows='{policy}')",
        rec.output,
        rec.scores,
    ), rec


def _status(x: Tensor | None, ref: Tensor, dead: Tensor, uniform: Tensor, *, tol: float) -> np.ndarray | None:
    """(b, h, t) status per query row: 'NaN' / 'zeros' / 'uniform' / 'attends some keys' for fully-masked rows;
    'NaN' / 'normal' (equals attnviz's softmax over the kept keys) / 'differs' for rows with keys."""
    if x is None:
        return None
    nan = torch.isnan(x).any(-1)
    zeros = (x.abs() <= 1e-6).all(-1)
    unif = ((x - uniform).abs() <= tol).all(-1)
    match = ((x - ref).abs() <= tol).all(-1)
    dead_status = np.where(nan, "NaN", np.where(zeros, "zeros", np.where(unif, "uniform", "attends some keys")))
    live_status = np.where(nan, "NaN", np.where(match, "normal", "differs"))
    return np.where(dead.numpy(), dead_status, live_status)


def _row_diff(x: Tensor | None, ref: Tensor) -> np.ndarray:
    """(b, h, t) max |x - ref| over the row; NaN where x has NaN; NaN everywhere when x is missing."""
    if x is None:
        return np.full(ref.shape[:-1], np.nan)
    diff = (x - ref).abs()
    out = diff.nan_to_num(0.0).amax(-1)
    return torch.where(torch.isnan(x).any(-1), torch.full_like(out, float("nan")), out).numpy()


def _count(statuses: np.ndarray) -> str:
    if statuses.size == 0:
        return "—"
    return ", ".join(f"{k} ×{n}" for k, n in Counter(statuses.tolist()).most_common())


def _same(a: Tensor | None, b: Tensor, tol: float) -> bool:
    return a is not None and torch.allclose(a, b, atol=tol, rtol=0.0, equal_nan=True)


def compare_frameworks(keep: Tensor, *, head_dim: int = 8, seed: int = 0, include_keras: bool = True) -> Comparison:
    """Run torch MultiheadAttention, SDPA, Keras MultiHeadAttention, d2l's masked_softmax and attnviz on the same
    seeded per-head q, k, v (b, h, ·, head_dim) with the same keep-mask (b, h, t, s), and tabulate what each does
    with every query row. Projections are the identity (no bias), so per-head outputs are directly comparable;
    the reference for |Δ| is attnviz's default policy ('zeros')."""
    keep = torch.as_tensor(keep).bool()
    if keep.dim() != 4:
        raise ValueError(f"keep must be (b, h, t, s), got shape {tuple(keep.shape)}")
    b, h, t, s = keep.shape
    if t > COMPARE_MAX or s > COMPARE_MAX or b * h > COMPARE_MAX_ROWS:
        raise ValueError(
            f"the framework comparison runs on t, s <= {COMPARE_MAX} and b·h <= {COMPARE_MAX_ROWS}; "
            f"this mask is b={b}, h={h}, t={t}, s={s}"
        )
    if not 1 <= head_dim <= 64:
        raise ValueError(f"head_dim ({head_dim}) must be between 1 and 64")
    keep = keep.contiguous()
    gen = torch.Generator().manual_seed(int(seed))
    q = torch.randn(b, h, t, head_dim, generator=gen)
    k = torch.randn(b, h, s, head_dim, generator=gen)
    v = torch.randn(b, h, s, head_dim, generator=gen)

    references = {p: _run_attnviz(q, k, v, keep, p) for p in MASKED_ROW_POLICIES}
    runs: list[FrameworkRun] = []
    makers = [
        ("torch MultiheadAttention (need_weights=True)", lambda: _run_torch_mha(q, k, v, keep, True)),
        ("torch MultiheadAttention (need_weights=False)", lambda: _run_torch_mha(q, k, v, keep, False)),
        ("SDPA (bool mask)", lambda: _run_sdpa(q, k, v, keep, "bool")),
        ("SDPA (additive 0/−inf mask)", lambda: _run_sdpa(q, k, v, keep, "additive")),
        ("SDPA (is_causal=True)", lambda: _run_sdpa(q, k, v, keep, "causal")),
    ]
    if include_keras:
        makers += [
            ("Keras MultiHeadAttention (return_attention_scores=True)", lambda: _run_keras(q, k, v, keep, True)),
            ("Keras MultiHeadAttention (fused, no scores)", lambda: _run_keras(q, k, v, keep, False)),
        ]
    makers.append(("d2l masked_softmax (−1e6)", lambda: _run_d2l(q, k, v, keep)))
    with torch.no_grad():
        for name, make in makers:
            try:
                runs.append(make())
            except (RuntimeError, ValueError, TypeError) as err:  # a reference that fails is a finding, not a crash
                runs.append(FrameworkRun(name, "", None, None, f"failed: {type(err).__name__}: {err}"))
    runs += [references[p][0] for p in MASKED_ROW_POLICIES]

    ref = references["zeros"][1]
    dead = fully_masked(keep)  # (b, h, t)
    tol = 1e-5
    uniform_out = v.mean(dim=2, keepdim=True)  # (b, h, 1, d): attending every key equally
    uniform_p = torch.full((1, 1, 1, s), 1.0 / s)
    summary, long_rows = [], []
    for run in runs:
        out_status = _status(run.output, ref.output, dead, uniform_out, tol=1e-4)
        p_status = _status(run.probs, ref.scores, dead, uniform_p, tol=tol)
        out_diff = _row_diff(run.output, ref.output)
        p_diff = _row_diff(run.probs, ref.scores)
        if out_status is None:
            status = np.full((b, h, t), "not run", dtype=object)
        elif p_status is None:
            status = out_status.astype(object)
        else:
            status = np.where(
                out_status == p_status,
                out_status,
                np.char.add(np.char.add(out_status, " (probabilities "), np.char.add(p_status, ")")),
            )
        matches = [
            p
            for p in MASKED_ROW_POLICIES
            if run.output is not None
            and _same(run.output, references[p][1].output, 1e-4)
            and (run.probs is None or _same(run.probs, references[p][1].scores, tol))
        ]
        notes = [run.note] if run.note else []
        live_nan = int(((torch.isnan(run.output).any(-1)) & ~dead).sum()) if run.output is not None else 0
        if live_nan:
            notes.append(
                f"NaN also in {live_nan} row(s) that have keys: a dead head's NaN reaches the other heads "
                "of the same query through the output projection (0 × NaN = NaN)"
            )
        live = ~dead.numpy()
        summary.append(
            {
                "framework": run.name,
                "returns probabilities": run.probs is not None,
                "fully-masked rows": _count(status[dead.numpy()]) if run.output is not None else "not run",
                "rows with keys": _count(status[live]) if run.output is not None else "not run",
                "max |Δ| output, rows with keys": float(np.max(out_diff[live])) if live.any() else float("nan"),
                "max |Δ| output, fully-masked rows": float(np.max(out_diff[~live])) if (~live).any() else float("nan"),
                "same as attnviz policy": ", ".join(matches) if matches else ("—" if run.output is None else "none"),
                "how it was called": run.call,
                "notes": "; ".join(notes),
            }
        )
        for bi in range(b):
            for hi in range(h):
                for qi in range(t):
                    long_rows.append(
                        {
                            "framework": run.name,
                            "batch": bi,
                            "head": hi,
                            "query": qi,
                            "keys kept": int(keep[bi, hi, qi].sum()),
                            "status": status[bi, hi, qi],
                            "max |Δ| output": float(out_diff[bi, hi, qi]),
                            "max |Δ| probabilities": float(p_diff[bi, hi, qi]),
                        }
                    )
    keras, _ = _keras() if include_keras else (None, "")
    versions = f"torch {torch.__version__}" + (
        f", keras {keras.__version__} ({keras.backend.backend()} backend)" if keras is not None else ""
    )
    return Comparison(q, k, v, keep, tuple(runs), pd.DataFrame(summary), pd.DataFrame(long_rows), versions)


def row_table(comparison: Comparison, batch: int, head: int) -> pd.DataFrame:
    """Per query row of one (batch, head): each framework's status and max |Δ| output vs attnviz ('zeros')."""
    rows = comparison.rows
    sel = rows[(rows["batch"] == batch) & (rows["head"] == head)]
    if sel.empty:
        raise ValueError(f"no rows for batch {batch}, head {head}")

    def cell(r) -> str:
        if r["status"] == "not run":
            return "not run"
        diff = r["max |Δ| output"]
        return f"{r['status']} · Δ {'NaN' if np.isnan(diff) else f'{diff:.1e}'}"

    table = sel.assign(cell=sel.apply(cell, axis=1)).pivot(index="query", columns="framework", values="cell")
    table = table[[r.name for r in comparison.runs]]  # frameworks in run order
    table.columns = [r.short for r in comparison.runs]
    kept = sel.drop_duplicates("query").set_index("query")["keys kept"]
    table.insert(0, "keys kept", kept)
    return table.reset_index()


def dead_row_behaviour(include_keras: bool = True) -> dict[str, str]:
    """What each framework does with a fully-masked query row, measured now on a small probe (not assumed).

    Frameworks that build their own mask (SDPA is_causal) are left out: they never see the probe's dead row.
    """
    keep = torch.ones(1, 2, 3, 4, dtype=torch.bool)
    keep[0, 0, 1] = False  # head 0, query 1: every key masked
    keep[0, 1, :, 2:] = False
    comp = compare_frameworks(keep, head_dim=4, seed=0, include_keras=include_keras)
    out = {}
    for run, (_, row) in zip(comp.runs, comp.summary.iterrows(), strict=True):
        if run.mask_applied:
            out[run.name] = row["fully-masked rows"].split(" ×")[0] if run.output is not None else run.note
    return out
