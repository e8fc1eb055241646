"""Code that recomputes a Playground configuration: plain PyTorch, or Keras 3 (a real MultiHeadAttention).

    pytorch_snippet(config)     plain-PyTorch code that recomputes the Playground's numbers
    keras_snippet(config)       Keras 3 code (a real keras.layers.MultiHeadAttention) that does the same
    snippet_refusal(config)     why a config has no snippet (too big, a dtype or score mode Keras lacks), or None

The snippets embed the configuration's inputs and weights (float32, zlib + base64) rather than re-deriving
them, so they need neither attnviz nor the same random-number code: run one and it prints, and can save, the
same output and probabilities the app shows (the tests run them and compare to 1e-5).
"""

from __future__ import annotations

import base64
import zlib

import numpy as np

from attnviz.engine import AttentionResult
from attnviz.pagemodels import playground as pg  # the package this module belongs to

__all__ = ["snippet_refusal", "pytorch_snippet", "keras_snippet", "MAX_SNIPPET_BYTES"]

MAX_SNIPPET_BYTES = 4 * 2**20  # a snippet bigger than this is not a snippet any more


# ------------------------------------------------------------------------------------------------------------
# code snippets
# ------------------------------------------------------------------------------------------------------------


def _blob(array) -> str:
    """float32 / uint8 bytes, zlib-compressed, base64: compact and exact."""
    arr = np.ascontiguousarray(array)
    return base64.b64encode(zlib.compress(arr.tobytes(), 9)).decode()


def _tensor_line(name: str, array: np.ndarray, comment: str, dtype: str = "float32") -> str:
    arr = np.asarray(array, dtype=np.float32 if dtype == "float32" else np.uint8)
    return f'{name} = _tensor("{_blob(arr)}", {tuple(arr.shape)}, torch.{dtype})  # {comment}'


def snippet_refusal(config: pg.PlaygroundConfig, language: str = "pytorch") -> str | None:
    """Why no snippet can be made for this config (cheap: nothing is run), or None."""
    if config.dtype != "float32":
        return f"code snippets reproduce float32 runs; this configuration uses {config.dtype}"
    try:
        config.validate()
    except ValueError as err:
        return str(err)
    m, h, g = config.model_dim, config.num_heads, config.num_kv_heads or config.num_heads
    d, v = config.key_dim, config.value_dim or config.key_dim
    # Weights and inputs are embedded: float32, about 4/3 more for base64.
    numbers = m * h * d + m * g * (d + v) + h * v * (config.output_dim or m) + config.batch * (config.t + config.s) * m
    if numbers * 4 * 4 // 3 > MAX_SNIPPET_BYTES:
        return (
            f"the snippet would embed {numbers:,} numbers (about {numbers * 16 // 3:,} bytes, over "
            f"{MAX_SNIPPET_BYTES:,}): the weights are too large; shrink model_dim, heads or key_dim"
        )
    if language == "keras":
        reasons = []
        if config.score_mode != "scaled_dot":
            reasons.append(f"score_mode {config.score_mode!r} (Keras MultiHeadAttention scores scaled_dot only)")
        if config.score_mod != "none":
            reasons.append(f"score_mod {config.score_mod!r}")
        if config.training and config.dropout > 0:
            reasons.append("training-mode dropout (Keras draws its own random mask)")
        if config.masked_rows != "zeros":
            reasons.append(f"masked_rows {config.masked_rows!r} (Keras gives fully-masked rows zeros)")
        gqa = g != h
        if gqa and (config.value_dim not in (0, config.key_dim) or config.output_dim not in (0, config.model_dim)):
            reasons.append("value_dim / output_shape with grouped-query heads (Keras GroupQueryAttention has neither)")
        if reasons:
            return "no Keras snippet for this configuration: " + "; ".join(reasons)
    return None


def _parts(config: pg.PlaygroundConfig, language: str = "pytorch"):
    """Layer, inputs and record of the config (the same run the Playground draws)."""
    problem = snippet_refusal(config, language)
    if problem:
        raise ValueError(problem)
    layer = pg.build_layer(config)
    query, value = pg.make_inputs(config)
    record = pg.run(config)
    return layer, query, value, record


def _keep_array(record: AttentionResult) -> np.ndarray | None:
    return None if record.mask is None else record.mask.detach().cpu().numpy().astype(np.uint8)  # (b|1, h|1, t, s)


_HELPER = '''def _tensor(data, shape, dtype):
    """Decode an embedded tensor (zlib-compressed raw bytes, base64)."""
    raw = bytearray(zlib.decompress(base64.b64decode(data)))
    return torch.frombuffer(raw, dtype=dtype).reshape(shape).clone()
'''


def pytorch_snippet(config: pg.PlaygroundConfig) -> str:
    """Self-contained plain-PyTorch code that recomputes this Playground configuration.

    Run it as ``python snippet.py [out.pt]``: it prints the output and probabilities, and saves
    {"output", "probabilities", "head_outputs"} to out.pt when a path is given.
    """
    layer, query, value, record = _parts(config)
    h, g = layer.num_heads, layer.num_kv_heads
    d, v = layer.key_dim, layer.value_dim
    w = {
        name: getattr(layer, name).detach().cpu().numpy()
        for name in ("query_kernel", "key_kernel", "value_kernel", "output_kernel")
    }
    lines = [
        '"""attnviz Playground configuration reproduced in plain PyTorch (attnviz not needed).',
        "",
        *[f"    {line}" for line in _describe(config)],
        '"""',
        "import base64",
        "import math",
        "import sys",
        "import zlib",
        "",
        "import torch",
        "",
        _HELPER,
        f"b, t, s, h, g, d, v = {config.batch}, {config.t}, {config.s}, {h}, {g}, {d}, {v}  "
        "# batch, queries, keys, query heads, kv heads, head dims",
        _tensor_line("query_input", query.numpy(), f"(b, t, dim) = {tuple(query.shape)}"),
        _tensor_line("value_input", value.numpy(), f"(b, s, dim) = {tuple(value.shape)}; key input = value"),
        _tensor_line("W_q", w["query_kernel"], "(dim, h, d) Keras EinsumDense layout"),
        _tensor_line("W_k", w["key_kernel"], "(dim, g, d)"),
        _tensor_line("W_v", w["value_kernel"], "(dim, g, v)"),
        _tensor_line("W_o", w["output_kernel"], "(h, v, o)"),
    ]
    if layer.use_bias:
        for name, label, shape in (
            ("query_bias", "b_q", "(h, d)"),
            ("key_bias", "b_k", "(g, d)"),
            ("value_bias", "b_v", "(g, v)"),
            ("output_bias", "b_o", "(o,)"),
        ):
            lines.append(_tensor_line(label, getattr(layer, name).detach().cpu().numpy(), shape))
    lines += [
        "",
        "Q = torch.einsum('btm,mhd->bhtd', query_input, W_q)  # (b, h, t, d)",
        "K = torch.einsum('bsm,mgd->bgsd', value_input, W_k)  # (b, g, s, d)",
        "V = torch.einsum('bsm,mgv->bgsv', value_input, W_v)  # (b, g, s, v)",
    ]
    if layer.use_bias:
        lines += ["Q = Q + b_q[:, None, :]", "K = K + b_k[:, None, :]", "V = V + b_v[:, None, :]"]
    lines += [
        "# Grouped-query attention: query head u reads kv head u // (h // g).",
        "K_h = K.repeat_interleave(h // g, dim=1)  # (b, h, s, d)",
        "V_h = V.repeat_interleave(h // g, dim=1)  # (b, h, s, v)",
    ]
    mode = config.score_mode
    if mode == "scaled_dot":
        lines.append("logits = (Q * (1.0 / math.sqrt(d))) @ K_h.transpose(-1, -2)  # (b, h, t, s)")
    elif mode == "dot":
        lines.append("logits = Q @ K_h.transpose(-1, -2)  # (b, h, t, s): Luong, no scaling")
    elif mode == "concat":
        lines.append("logits = torch.tanh(Q[:, :, :, None, :] + K_h[:, :, None, :, :]).sum(-1)  # (b, h, t, s)")
    else:
        lines += [
            _tensor_line("w_add", layer.score_scale.detach().cpu().numpy(), "(h, 1, 1, d) learned weights"),
            "pairs = torch.tanh(Q[:, :, :, None, :] + K_h[:, :, None, :, :])  # (b, h, t, s, d)",
            "logits = (w_add[None, :, :, :, :] * pairs).sum(-1)  # (b, h, t, s): Bahdanau",
        ]
    if config.score_mod == "alibi":
        lines += [
            "slopes = torch.tensor([2.0 ** (-8.0 * (u + 1) / h) for u in range(h)])  # ALiBi slopes",
            "distance = (torch.arange(s)[None, :] - torch.arange(t)[:, None]).float()  # (t, s): key - query",
            "logits = logits + slopes[None, :, None, None] * distance  # (b, h, t, s)",
        ]
    elif config.score_mod == "softcap":
        lines.append(f"logits = {float(config.softcap)!r} * torch.tanh(logits / {float(config.softcap)!r})  # soft-cap")
    keep = _keep_array(record)
    if keep is not None:
        lines += [
            _tensor_line("keep", keep, f"(b|1, h|1, t, s) True = may attend: {record.mask_fn.name}", "uint8"),
            "keep = keep.bool()",
            "masked = logits.masked_fill(~keep, float('-inf'))",
        ]
    else:
        lines.append("masked = logits  # no mask")
    lines += [
        "probabilities = torch.softmax(masked, dim=-1)  # (b, h, t, s)",
        "dead = torch.isneginf(masked).all(dim=-1)  # (b, h, t): query rows with no key left",
    ]
    if config.masked_rows == "zeros":
        lines.append("probabilities = probabilities.masked_fill(dead[..., None], 0.0)  # 'zeros' policy")
    elif config.masked_rows == "uniform":
        lines.append("probabilities = probabilities.masked_fill(dead[..., None], 1.0 / s)  # 'uniform' policy")
    else:
        lines.append("# 'nan' policy: such rows stay NaN, as torch.nn.MultiheadAttention gives them")
    if config.training and config.dropout > 0:
        lines += [
            f"rate = {float(config.dropout)!r}  # training-mode dropout, seeded as the app seeds it",
            f"generator = torch.Generator().manual_seed({int(config.seed) * 1_000_003 + 1})",
            "kept = torch.rand(probabilities.shape, generator=generator) >= rate",
            "weights = probabilities * kept / (1.0 - rate)",
        ]
    else:
        lines.append("weights = probabilities  # no dropout at inference")
    lines += [
        "head_outputs = weights @ V_h  # (b, h, t, v)",
        "output = torch.einsum('bhtv,hvo->bto', head_outputs, W_o)  # (b, t, o): concat heads, then W_o",
    ]
    if layer.use_bias:
        lines.append("output = output + b_o")
    lines += [
        "",
        "torch.set_printoptions(precision=4, sci_mode=False)",
        "print('output', tuple(output.shape))",
        "print(output)",
        "print('probabilities (batch 0, head 0)')",
        "print(probabilities[0, 0])",
        "if len(sys.argv) > 1:",
        "    torch.save({'output': output, 'probabilities': probabilities, 'head_outputs': head_outputs}, sys.argv[1])",
        "",
    ]
    return _checked("\n".join(lines))


def _describe(config: pg.PlaygroundConfig) -> list[str]:
    defaults = pg.PlaygroundConfig()
    changed = [f"{k}={v!r}" for k, v in pg.config_values(config).items() if pg.config_values(defaults).get(k) != v]
    text = "PlaygroundConfig(" + ", ".join(changed) + ")"
    return [text[i : i + 100] for i in range(0, len(text), 100)]


def _checked(code: str) -> str:
    if len(code.encode()) > MAX_SNIPPET_BYTES:
        raise ValueError(
            f"the snippet would be {len(code.encode()):,} bytes (over {MAX_SNIPPET_BYTES:,}): the "
            "embedded weights are too large; shrink model_dim, heads or lengths"
        )
    return code


def keras_snippet(config: pg.PlaygroundConfig) -> str:
    """Keras 3 code that builds a real ``keras.layers.MultiHeadAttention`` (``GroupQueryAttention`` for GQA) with
    the Playground's weights and runs it on the same inputs and mask.

    Keras has no ALiBi/soft-cap, concat/additive MHA scores or seeded dropout that matches torch's, so those
    configurations are refused with a message; Keras returns all-zero probabilities for fully-masked rows.
    """
    gqa = (config.num_kv_heads or config.num_heads) != config.num_heads
    layer, query, value, record = _parts(config, "keras")
    keep = _keep_array(record)
    if keep is not None and keep.shape[1] != 1:
        raise ValueError("no Keras snippet: the mask differs per head, and Keras' attention_mask has no head axis")
    names = ("query", "key", "value", "output")
    lines = [
        '"""attnviz Playground configuration reproduced with a real Keras 3 layer (attnviz not needed).',
        "",
        *[f"    {line}" for line in _describe(config)],
        "",
        "Run with any Keras 3 backend, e.g. KERAS_BACKEND=torch.",
        '"""',
        "import base64",
        "import sys",
        "import zlib",
        "",
        "import keras",
        "import numpy as np",
        "",
        '''def _array(data, shape, dtype):
    """Decode an embedded array (zlib-compressed raw bytes, base64)."""
    return np.frombuffer(zlib.decompress(base64.b64decode(data)), dtype=dtype).reshape(shape).copy()
''',
    ]

    def arr(name, array, comment, dtype="float32"):
        a = np.asarray(array, dtype=np.float32 if dtype == "float32" else np.uint8)
        return f'{name} = _array("{_blob(a)}", {tuple(a.shape)}, np.{dtype})  # {comment}'

    lines += [arr("query_input", query.numpy(), "(b, t, dim)"), arr("value_input", value.numpy(), "(b, s, dim)")]
    for n in names:
        lines.append(arr(f"{n}_kernel", getattr(layer, f"{n}_kernel").detach().numpy(), f"{n} kernel"))
        if layer.use_bias:
            lines.append(arr(f"{n}_bias", getattr(layer, f"{n}_bias").detach().numpy(), f"{n} bias"))
    if gqa:
        lines.append(
            f"layer = keras.layers.GroupQueryAttention(head_dim={layer.key_dim}, num_query_heads={layer.num_heads}, "
            f"num_key_value_heads={layer.num_kv_heads}, use_bias={layer.use_bias}, dropout={float(config.dropout)!r})"
        )
    else:
        out = f", output_shape={config.output_dim}" if config.output_dim else ""
        lines.append(
            f"layer = keras.layers.MultiHeadAttention(num_heads={layer.num_heads}, key_dim={layer.key_dim}, "
            f"value_dim={layer.value_dim}, use_bias={layer.use_bias}, dropout={float(config.dropout)!r}{out})"
        )
    mask_arg = ""
    if keep is not None:
        lines.append(arr("keep", keep[:, 0], f"(b|1, t, s) True = may attend: {record.mask_fn.name}", "uint8"))
        lines.append(f"attention_mask = np.broadcast_to(keep.astype(bool), ({config.batch}, {config.t}, {config.s}))")
        mask_arg = ", attention_mask=attention_mask"
    lines += [
        f"output, scores = layer(query_input, value_input{mask_arg}, return_attention_scores=True)  # builds it",
        "# Copy the weights into Keras' EinsumDense sub-layers (same (dim, heads, head_dim) layouts).",
    ]
    for n in names:
        weights = f"[{n}_kernel, {n}_bias]" if layer.use_bias else f"[{n}_kernel]"
        lines.append(f"layer._{n}_dense.set_weights({weights})")
    lines += [
        f"output, scores = layer(query_input, value_input{mask_arg}, return_attention_scores=True, training=False)",
        "output, scores = keras.ops.convert_to_numpy(output), keras.ops.convert_to_numpy(scores)",
        "np.set_printoptions(precision=4, suppress=True)",
        "print('output', output.shape)",
        "print(output)",
        "print('probabilities (batch 0, head 0)')",
        "print(scores[0, 0])",
        "if len(sys.argv) > 1:",
        "    np.savez(sys.argv[1], output=output, probabilities=scores)",
        "",
    ]
    return _checked("\n".join(lines))
