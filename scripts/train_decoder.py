"""Train the small decoder that attnviz ships (attnviz/assets/decoder/): a Llama-style causal LM that learned to copy.

    python scripts/train_decoder.py                        # the shipped model: seed 0, CPU, 1 thread
    python scripts/train_decoder.py --steps 50 --curriculum "" --out /tmp/decoder    # a quick smoke run elsewhere

Seeded and CPU-only (one thread by default: deterministic, and a busy machine's other work cannot stall it the
way it stalls OpenMP threads waiting for each other); the shipped run takes 6-9 minutes on this project's 2-core
machine (metrics.json records the time). Nothing is downloaded: the script makes its own data and tokenizer.

Data (``Corpus``): byte sequences, each ``[BOS]`` then text made of segments where copying pays, so that
previous-token and induction heads form (Olsson et al. 2022):
  copy      a random string of 3-30 characters (printable ASCII mostly; also a random subset of it, lowercase, hex,
            pseudo-words, or non-ASCII characters of several UTF-8 bytes) written twice, usually back to back,
            sometimes a third time or with a separator or a short filler between the copies
  kv        "key=value" lists, then some keys asked again with their values ("size=42; name=Tom. name=Tom")
  count     counting ("17 18 19 20", "c d e f") with a random start and step
  sentence  templated English ("Mia gave the red box to Leo. Then Mia ...") reusing names and nouns
The weights of the segment kinds are ``SEGMENT_WEIGHTS``. A curriculum (``--curriculum``) starts on short
sequences of copies only (16, then 32 tokens), where a copying head pays off after a few tokens, then 64 tokens,
then ``--seq-len`` with every kind. String lengths vary widely at every length, so that a head attending a fixed
distance back cannot copy as well as an induction head. Three layers: the first two-layer runs put their
previous-token head in the last layer, where nothing can compose with it; with three, layer 1 holds a
previous-token head and layer 2 the induction heads that read it.

Model: ``transformers.LlamaForCausalLM`` (RoPE, grouped-query attention: 8 query heads share 2 kv heads, SwiGLU,
RMSNorm, tied input/output embeddings). Tokenizer: byte-level, 256 byte tokens (id = the byte's value) plus
``<s>`` (id 256, the BOS every input starts with), built with the ``tokenizers`` library (a BPE model with the 256
byte symbols and no merges, ByteLevel pre-tokenizer and decoder) and saved as a ``PreTrainedTokenizerFast``. Any
text encodes (UTF-8 bytes) and decodes back exactly; a literal "<s>" in the text is text, not the BOS.

At the end the directory is reloaded the way the app loads it (``attnviz.models.load_model``) and measured with
``attnviz.induction.measure`` on held-out repeated random strings, against an untrained copy (same config, random
weights); the numbers, the command, the seed, the steps and the time go to metrics.json and README.md beside the
weights.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import string
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

BOS = "<s>"
BOS_ID = 256
VOCAB_SIZE = 257  # 256 bytes + <s>
DEFAULT_OUT = ROOT / "attnviz" / "assets" / "decoder"
EVAL_SEED = 20240601  # the held-out strings of the final measurement (training draws from --seed)
EVAL_PER_LENGTH = 32  # sequences per string length (attnviz.induction.DEFAULT_LENGTHS)

SEGMENT_WEIGHTS = {"copy": 0.8, "kv": 0.07, "count": 0.03, "sentence": 0.1}

LOWER = string.ascii_lowercase
ALNUM = string.ascii_letters + string.digits
PRINTABLE = string.ascii_letters + string.digits + string.punctuation
HEX = string.digits + "abcdef"
UNICODE = "éèàüößñçøåæœ€£¥αβγδλπΩжщыяשאبت日本語中文한국어🙂🎉→∑√"
SYLLABLES = [c + v for c in "bcdfghjklmnprstvz" for v in "aeiou"]
NAMES = "Mia Leo Ana Tom Eva Sam Zoe Max Ida Ben Noa Kai Lia Raj Yui Omar Lena Paul Nina Hugo".split()
NOUNS = "box cat dog key map cup hat pen book lamp coin ball ring seed leaf boat drum kite bell rope".split()
ADJS = "red big old new blue small green quiet bright heavy round soft".split()
VERBS = "gave sent showed handed threw passed sold lent".split()
PLACES = "market river garden school station forest library harbour".split()
WORDS = "alpha beta gamma delta echo delta kilo lima mike oscar papa romeo sierra tango victor zulu".split()


# ---------------------------------------------------------------------------------------------------------
# The tokenizer
# ---------------------------------------------------------------------------------------------------------


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's map from the 256 byte values to printable characters (the ByteLevel pre-tokenizer's alphabet)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs, strict=True)}


def build_tokenizer(max_length: int):
    """The byte-level tokenizer: id b is byte b, id 256 is <s> (added before every text)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    symbols = bytes_to_unicode()
    vocab = {symbols[b]: b for b in range(256)} | {BOS: BOS_ID}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([BOS])
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B:1", special_tokens=[(BOS, BOS_ID)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        model_max_length=max_length,
        clean_up_tokenization_spaces=False,  # decode(encode(text)) == text, spaces before punctuation included
        split_special_tokens=True,  # "<s>" typed by a user is three bytes, not the BOS
        model_input_names=["input_ids", "attention_mask"],
    )


def save_tokenizer(tokenizer, out: Path) -> None:
    tokenizer.save_pretrained(str(out))
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"  # the name both transformers 4 and 5 know
    config_file.write_text(json.dumps(config, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------------------
# The data
# ---------------------------------------------------------------------------------------------------------


class Corpus:
    """Endless seeded text where copying pays; ``batch`` returns (b, seq_len) byte ids, each row [BOS] + text."""

    def __init__(self, seed: int, seq_len: int):
        self.rng = np.random.default_rng(seed)
        self.seq_len = seq_len
        self.scale = 1.0  # span and gap lengths relative to a 128-token sequence (shorter in the curriculum)
        self.kinds = list(SEGMENT_WEIGHTS)
        self.weights = np.array([SEGMENT_WEIGHTS[k] for k in self.kinds]) / sum(SEGMENT_WEIGHTS.values())

    def _pick(self, items):
        return items[int(self.rng.integers(len(items)))]

    def _chars(self, alphabet: str, n: int) -> str:
        return "".join(alphabet[i] for i in self.rng.integers(len(alphabet), size=n))

    def _word(self) -> str:
        return "".join(self._pick(SYLLABLES) for _ in range(int(self.rng.integers(1, 4))))

    def random_span(self) -> str:
        """A random string of 3-30 characters (at most 7-15 in the curriculum's short sequences): most often
        printable ASCII drawn uniformly (the measured case), else from a random subset of it (repeats inside the
        string, which the model must tell apart), lowercase, hex, pseudo-words, or non-ASCII characters of
        several UTF-8 bytes."""
        # lengths vary widely at every scale: with a narrow range a head that looks a fixed distance back would
        # copy as well as an induction head, and the curriculum's short phase would teach that instead
        n = int(self.rng.integers(3, round(min(30, max(7, 60 * self.scale))) + 1))
        kind = self.rng.random()
        if kind < 0.6:
            return self._chars(PRINTABLE, n)
        if kind < 0.75:
            subset = self.rng.choice(list(PRINTABLE), size=int(self.rng.integers(6, 40)), replace=False)
            return self._chars("".join(subset), n)
        if kind < 0.82:
            return self._chars(self._pick([LOWER, HEX, ALNUM]), n)
        if kind < 0.95:
            words: list[str] = []
            while sum(len(w) + 1 for w in words) < n:
                words.append(self._word() if self.rng.random() < 0.7 else self._pick(WORDS))
            return " ".join(words)
        return self._chars(UNICODE, max(2, n // 3))

    def copy(self) -> str:
        """A random string written twice (a third time now and then), usually back to back as in the measured
        ``[BOS] r r``, sometimes with a separator or a short filler between the copies."""
        span = self.random_span()
        roll = self.rng.random()
        if roll < 0.7 or self.scale < 0.5:
            sep = ""
        elif roll < 0.9:
            sep = self._pick([" ", "\n", " | ", ": ", ", "])
        else:
            sep = " " + self._chars(LOWER + " ", int(self.rng.integers(2, 12))) + " "
        text = span + sep + span
        if self.rng.random() < 0.25:
            text += sep + span
        return text

    def kv(self) -> str:
        n = int(self.rng.integers(3, 7))
        keys = list(
            dict.fromkeys(self._pick([self._word(), self._pick(WORDS), f"k{self.rng.integers(100)}"]) for _ in range(n))
        )
        values = [
            self._pick([self._word(), str(int(self.rng.integers(1000))), self._pick(ADJS), self._chars(ALNUM, 4)])
            for _ in keys
        ]
        sep = self._pick(["; ", ", ", "\n", " "])
        eq = self._pick(["=", ": ", " = ", "->"])
        first = sep.join(f"{k}{eq}{v}" for k, v in zip(keys, values, strict=True))
        asked = self.rng.permutation(len(keys))[: int(self.rng.integers(1, len(keys) + 1))]
        return first + ". " + sep.join(f"{keys[i]}{eq}{values[i]}" for i in asked)

    def count(self) -> str:
        n = int(self.rng.integers(5, 16))
        if self.rng.random() < 0.6:
            start, step = int(self.rng.integers(0, 200)), int(self._pick([1, 1, 1, 2, 5, 10]))
            items = [str(start + step * i) for i in range(n)]
        else:
            alphabet = self._pick([string.ascii_lowercase, string.ascii_uppercase])
            start = int(self.rng.integers(0, 26 - min(n, 25)))
            items = list(alphabet[start : start + n])
        return self._pick([" ", ", ", " "]).join(items)

    def sentence(self) -> str:
        a, b = self.rng.choice(NAMES, size=2, replace=False)
        noun, adj, verb, place = self._pick(NOUNS), self._pick(ADJS), self._pick(VERBS), self._pick(PLACES)
        templates = [
            f"{a} and {b} went to the {place}. {a} {verb} the {adj} {noun} to {b}.",
            f"The {adj} {noun} is in the {place}. {a} saw the {adj} {noun} in the {place}.",
            f"{a} {verb} a {noun} to {b}. Then {b} {verb} the {noun} back to {a}.",
            f"At the {place}, {a} found a {adj} {noun}. The {noun} was {adj}.",
        ]
        return self._pick(templates)

    def text(self, min_bytes: int, copy_only: bool = False) -> bytes:
        out = b""
        while len(out) < min_bytes:
            short = self.scale < 0.5  # the curriculum's short sequences: copies only, back to back
            pick = int(self.rng.choice(len(self.kinds), p=self.weights))
            kind = "copy" if copy_only or short else self.kinds[pick]
            segment = getattr(self, kind)()
            out += (segment + ("" if short else self._pick([" ", "\n", "\n\n", ". "]))).encode("utf-8")
        return out

    def batch(self, batch_size: int, seq_len: int | None = None, copy_only: bool = False) -> torch.Tensor:
        seq_len = seq_len or self.seq_len
        self.scale = min(1.0, seq_len / 128)
        rows = []
        for _ in range(batch_size):
            data = self.text(seq_len - 1, copy_only)[: seq_len - 1]
            rows.append([BOS_ID, *data])
        return torch.tensor(rows, dtype=torch.long)  # (b, seq_len)


# ---------------------------------------------------------------------------------------------------------
# The model and the training loop
# ---------------------------------------------------------------------------------------------------------


def build_config(args):
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=8,
        num_key_value_heads=args.kv_heads,
        head_dim=args.head_dim,
        max_position_embeddings=args.seq_len,
        rope_theta=10000.0,
        rms_norm_eps=1e-5,
        initializer_range=0.02,
        tie_word_embeddings=not args.untie,
        bos_token_id=BOS_ID,
        eos_token_id=None,
        pad_token_id=None,
        attention_bias=args.attention_bias,
        architectures=["LlamaForCausalLM"],
    )


def phases(args) -> list[tuple[int, int, int]]:
    """(sequence length, batch size, steps) of each phase: the curriculum's short sequences, then the rest."""
    out = []
    for item in filter(None, args.curriculum.split(",")):
        shape, steps = item.split(":")
        seq_len, batch_size = shape.split("x")
        out.append((int(seq_len), int(batch_size), int(steps)))
    done = sum(p[2] for p in out)
    if done >= args.steps:
        raise ValueError(f"the curriculum's {done} steps leave none of --steps {args.steps} for --seq-len")
    return [*out, (args.seq_len, args.batch_size, args.steps - done)]


def phase_at(step: int, args) -> tuple[int, int]:
    for seq_len, batch_size, steps in phases(args):
        if step < steps:
            return seq_len, batch_size
        step -= steps
    raise AssertionError("past the last phase")


def lr_at(step: int, args) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def probe(model, tokenizer) -> dict:
    """A quick look while training (held-out strings of 4 lengths, 4 each): copy accuracy and, per layer, the best
    previous-token and induction scores. The training model runs the fused attention; eager for this look only."""
    from attnviz import induction

    model.set_attn_implementation("eager")
    try:
        report = induction.measure(model, tokenizer, num_sequences=4, lengths=(11, 17, 23, 29), seed=EVAL_SEED + 1)
    finally:
        model.set_attn_implementation("sdpa")
        model.train()
    return {
        "copy_accuracy": round(report.copy_accuracy, 4),
        "previous_token_by_layer": [round(float(x), 3) for x in report.previous_token.max(axis=1)],
        "induction_by_layer": [round(float(x), 3) for x in report.induction.max(axis=1)],
    }


def train(args) -> dict:
    from transformers import LlamaForCausalLM

    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    tokenizer = build_tokenizer(args.seq_len)
    sample = "key=value 🙂"
    assert tokenizer(sample)["input_ids"] == [BOS_ID, *sample.encode()], "byte id b must be token id b"
    config = build_config(args)
    model = LlamaForCausalLM(config)  # seeded init; the fused (sdpa) attention while training
    if args.freeze_embeddings:
        model.model.embed_tokens.weight.requires_grad_(False)
    params = sum(p.numel() for p in model.parameters())
    print(f"{params:,} parameters; {json.dumps({k: v for k, v in vars(args).items() if k != 'out'})}", flush=True)
    corpus = Corpus(args.seed, args.seq_len)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and p.requires_grad]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 and p.requires_grad]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr,
        betas=(0.9, 0.98),
    )
    model.train()
    started = time.monotonic()
    history = []
    loss_avg = None
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        seq_len, batch_size = phase_at(step, args)
        ids = corpus.batch(batch_size, seq_len, copy_only=step < args.copy_warmup)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        value = float(loss.detach())
        loss_avg = value if loss_avg is None else 0.95 * loss_avg + 0.05 * value
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            looked = probe(model, tokenizer)
            elapsed = time.monotonic() - started
            history.append({"step": step + 1, "loss": round(loss_avg, 4), **looked, "seconds": round(elapsed, 1)})
            print(
                f"step {step + 1:5d}  loss {loss_avg:.4f}  copy acc {looked['copy_accuracy']:.3f}  previous-token "
                f"{looked['previous_token_by_layer']}  induction {looked['induction_by_layer']}  {elapsed:5.0f} s",
                flush=True,
            )
    seconds = time.monotonic() - started

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    save_tokenizer(tokenizer, out)
    return {"parameters": params, "train_seconds": round(seconds, 1), "history": history}


def evaluate(out: Path, seed: int) -> dict:
    """The saved directory, loaded as the app loads it, and an untrained copy, on held-out repeated strings."""
    from attnviz import induction, models

    loaded = models.load_model(out)
    trained = induction.measure(loaded.model, loaded.tokenizer, num_sequences=EVAL_PER_LENGTH, seed=EVAL_SEED)
    fresh = induction.untrained_copy(loaded.model, seed=seed)
    baseline = induction.measure(fresh, loaded.tokenizer, num_sequences=EVAL_PER_LENGTH, seed=EVAL_SEED)
    return {"trained": trained.as_dict(), "untrained": baseline.as_dict()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="model directory to write (default: the package's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=5500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=128, help="tokens per training sequence, BOS included")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--intermediate", type=int, default=256)
    parser.add_argument("--head-dim", type=int, default=32, help="per head (8 query heads, 2 kv heads)")
    parser.add_argument("--attention-bias", action="store_true", help="biases on q/k/v/o (as Qwen2)")
    parser.add_argument("--kv-heads", type=int, default=2, help="kv heads shared by the 8 query heads (GQA)")
    parser.add_argument("--untie", action="store_true", help="separate input and output embeddings")
    parser.add_argument("--freeze-embeddings", action="store_true", help="keep the input embeddings at their init")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=60)
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--copy-warmup", type=int, default=0, help="first steps on copy segments only")
    parser.add_argument(
        "--curriculum",
        default="16x32:2500,32x32:1000,64x32:1000",
        help="short sequences first: LENxBATCH:STEPS,... (e.g. 32x64:400,64x32:400); those steps count in --steps",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--log-every", type=int, default=250)
    args = parser.parse_args(argv)
    from attnviz import induction

    started = time.monotonic()
    result = train(args)
    out = Path(args.out)
    measured = evaluate(out, args.seed)
    weights = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    import tokenizers
    import transformers

    metrics = {
        "command": "python scripts/train_decoder.py " + shlex.join(argv if argv is not None else sys.argv[1:]),
        "seed": args.seed,
        "steps": args.steps,
        "batch_size": args.batch_size,
        "seq_len": args.seq_len,
        "phases": [{"seq_len": t, "batch_size": b, "steps": n} for t, b, n in phases(args)],
        "tokens_seen": sum(t * b * n for t, b, n in phases(args)),
        "train_seconds": result["train_seconds"],
        "total_seconds": round(time.monotonic() - started, 1),
        "threads": args.threads,
        "parameters": result["parameters"],
        "weights_bytes": weights,
        "config": {
            "layers": args.layers,
            "hidden_size": args.hidden,
            "intermediate_size": args.intermediate,
            "query_heads": 8,
            "kv_heads": args.kv_heads,
            "head_dim": args.head_dim,
            "max_positions": args.seq_len,
            "vocab_size": VOCAB_SIZE,
            "rope_theta": 10000.0,
        },
        "eval": {
            "seed": EVAL_SEED,
            "alphabet": "letters, digits, punctuation",
            "sequences_per_length": EVAL_PER_LENGTH,
            "lengths": list(induction.DEFAULT_LENGTHS),
            "format": "[BOS] r r",
        },
        **measured,
        "history": result["history"],
        "versions": {
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "python": platform.python_version(),
        },
    }
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    (out / "README.md").write_text(readme(metrics))
    print(summary(metrics), flush=True)


def summary(metrics: dict) -> str:
    t, u = metrics["trained"], metrics["untrained"]

    def line(m: dict) -> str:
        return (
            f"induction {m['best_induction_score']:.3f} "
            f"(L{m['best_induction_head'][0]} H{m['best_induction_head'][1]}), "
            f"previous-token {m['best_previous_token_score']:.3f} (L{m['best_previous_token_head'][0]} "
            f"H{m['best_previous_token_head'][1]}), copy accuracy {m['copy_accuracy']:.3f}"
        )

    return (
        f"trained:   {line(t)}\nuntrained: {line(u)}\n"
        f"weights {metrics['weights_bytes'] / 1e6:.2f} MB, training {metrics['train_seconds']:.0f} s"
    )


def readme(metrics: dict) -> str:
    """The model card written beside the weights."""
    t, u = metrics["trained"], metrics["untrained"]
    ev = metrics["eval"]
    phases = ", ".join(f"{p['steps']} steps × {p['batch_size']} × {p['seq_len']} tokens" for p in metrics["phases"])
    rows = "\n".join(
        f"| {name} | {m['best_induction_score']:.3f} (layer {m['best_induction_head'][0]}, head "
        f"{m['best_induction_head'][1]}) | {m['best_previous_token_score']:.3f} (layer "
        f"{m['best_previous_token_head'][0]}, head {m['best_previous_token_head'][1]}) | {m['copy_accuracy']:.3f} |"
        for name, m in (("trained (this model)", t), ("untrained copy (same config, random init)", u))
    )
    return f"""# attnviz copying decoder

A small Llama-style causal language model shipped with attnviz (`attnviz.models.packaged_decoder_path()`), trained
from scratch on CPU by `scripts/train_decoder.py` on text it generates itself, where copying pays: random strings
written twice, key=value lists asked again, counting, templated sentences. It has previous-token and induction
heads (Olsson et al. 2022), which is what it is for: looking at real learned attention offline.

- `LlamaForCausalLM`: {metrics["config"]}
- {metrics["parameters"]:,} parameters, {metrics["weights_bytes"] / 1e6:.2f} MB of float32 safetensors
- tokenizer: byte-level, ids 0-255 are the bytes of the UTF-8 text, 256 is `<s>` (the BOS put before every text);
  any text encodes and decodes back exactly
- trained with `{metrics["command"]}`: seed {metrics["seed"]}, {metrics["steps"]} steps in phases of
  {phases} ({metrics["tokens_seen"]:,} tokens), {metrics["train_seconds"]:.0f} s on
  {metrics["threads"]} CPU thread(s)

Measured by `attnviz.induction.measure` on held-out sequences `[BOS] r r`, r a random string of letters, digits and
punctuation, {ev["sequences_per_length"]} sequences for each length in {ev["lengths"]} (seed {ev["seed"]}):

| model | best induction score | best previous-token score | copy accuracy |
|---|---|---|---|
{rows}

Induction score: a head's mean attention from each token of the second copy to the token after its first occurrence.
Previous-token score: mean attention from each token to the one before it. Copy accuracy: greedy next-token accuracy
on the second copy, its first token excluded. All numbers are in `metrics.json`.

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from attnviz.models import packaged_decoder_path

model = AutoModelForCausalLM.from_pretrained(packaged_decoder_path())
tokenizer = AutoTokenizer.from_pretrained(packaged_decoder_path())
```
"""


if __name__ == "__main__":
    main()
