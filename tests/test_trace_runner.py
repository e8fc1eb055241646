"""`attnviz trace script.py`: a user's script runs as __main__ under attnviz.capture() and its attention calls are
saved as a trace, checked by loading the file (each call's output reproduced to ≤ 1e-5); a script that raises still
saves what it captured, with its traceback and exit status 1; a missing script, a script without attention calls
and a bad command line get a message, not a traceback of ours."""

from __future__ import annotations

import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import attnviz
from attnviz.trace_runner import NoCallsCaptured, ScriptFailed, run_script, summary_lines

ROOT = Path(__file__).resolve().parents[1]

NANOGPT = textwrap.dedent(
    """
    import sys
    import torch
    import torch.nn.functional as F
    from torch import nn


    class CausalSelfAttention(nn.Module):
        def __init__(self, dim=16, heads=2):
            super().__init__()
            self.heads = heads
            self.c_attn, self.c_proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

        def forward(self, x):
            b, t, d = x.shape
            q, k, v = self.c_attn(x).split(d, dim=2)
            q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            return self.c_proj(y.transpose(1, 2).reshape(b, t, d))


    if __name__ == "__main__":
        torch.manual_seed(0)
        model = nn.Sequential(CausalSelfAttention(), CausalSelfAttention()).eval()
        numbers = [int(a) for a in sys.argv[1:] if a.isdigit()]
        tokens = numbers[0] if numbers else 5
        with torch.no_grad():
            model(torch.randn(2, tokens, 16))
        print("ran with", sys.argv[1:])
        if "--fail" in sys.argv:
            raise RuntimeError("the script broke after its model ran")
    """
)


def _attnviz(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.run(
        [sys.executable, "-m", "attnviz", "trace", *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300
    )


@pytest.fixture
def script(tmp_path) -> Path:
    path = tmp_path / "tiny_gpt.py"
    path.write_text(NANOGPT)
    return path


def test_the_command_traces_a_script_and_the_file_loads(script, tmp_path):
    done = _attnviz("tiny_gpt.py", "7", "-o", "x.trace", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "ran with ['7']" in done.stdout  # the script's own argv, without the -o of attnviz
    lines = done.stdout.splitlines()
    assert any(line.startswith("sdpa ") and "(b, h, t, s) = (2, 2, 7, 7)" in line for line in lines), lines
    assert lines[-1] == f"wrote 2 attention calls to {(tmp_path / 'x.trace').resolve()}"
    trace = attnviz.load_trace(tmp_path / "x.trace")
    assert [c.name for c in trace.calls] == ["sdpa", "sdpa#1"]
    for call in trace.calls:
        assert call.record.grid_shape == (2, 2, 7, 7)
        assert call.output_error <= 1e-5
        assert bool(call.record.mask_grid[0, 0].tril().eq(call.record.mask_grid[0, 0]).all())  # causal


def test_default_output_name_and_options_before_the_script(script, tmp_path):
    done = _attnviz("--calls", "sdpa#1", "tiny_gpt.py", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    trace = attnviz.load_trace(tmp_path / "tiny_gpt.trace")  # <script stem>.trace in the current folder
    assert [c.name for c in trace.calls] == ["sdpa#1"]
    # "--" hands a final -o to the script itself
    done = _attnviz("-o", "y.trace", "tiny_gpt.py", "--", "4", "-o", "mine", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "ran with ['4', '-o', 'mine']" in done.stdout
    assert attnviz.load_trace(tmp_path / "y.trace").calls[0].record.grid_shape[2] == 4


def test_a_failing_script_prints_its_traceback_and_keeps_what_it_captured(script, tmp_path):
    done = _attnviz("tiny_gpt.py", "--fail", "-o", "broken.trace", cwd=tmp_path)
    assert done.returncode == 1
    assert "Traceback (most recent call last)" in done.stderr
    assert "RuntimeError: the script broke after its model ran" in done.stderr
    assert 'File "tiny_gpt.py"' in done.stderr and "runpy" not in done.stderr  # the script's frames, not ours
    assert "the 2 attention calls captured before the error are saved to" in done.stderr
    assert len(attnviz.load_trace(tmp_path / "broken.trace").calls) == 2


def test_missing_script_no_calls_and_bad_command_lines(tmp_path):
    done = _attnviz("nowhere.py", cwd=tmp_path)
    assert done.returncode == 2 and "the script 'nowhere.py' does not exist" in done.stderr
    assert "Traceback" not in done.stderr
    (tmp_path / "plain.py").write_text("print('no attention here')\n")
    done = _attnviz("plain.py", cwd=tmp_path)
    assert done.returncode == 1 and "no attention call was captured" in done.stderr
    assert not (tmp_path / "plain.trace").exists()
    done = _attnviz(cwd=tmp_path)
    assert done.returncode == 2 and "give the script to run" in done.stderr
    done = _attnviz("--max-mb", "lots", "plain.py", cwd=tmp_path)
    assert done.returncode == 2 and "--max-mb takes a number" in done.stderr


def test_help_explains_the_command(tmp_path):
    done = _attnviz("--help", cwd=tmp_path)
    assert done.returncode == 0
    assert done.stdout.startswith("usage: attnviz trace")
    for words in ("__main__", "-o, --output FILE", "<script stem>.trace", "output_error", "Trace page", "--calls"):
        assert words in done.stdout, words


def test_run_script_in_process(script, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    argv = list(sys.argv)
    trace = run_script(script, ["3"], tmp_path / "in.trace")
    assert sys.argv == argv  # restored
    assert [c.record.grid_shape for c in trace.calls] == [(2, 2, 3, 3)] * 2
    lines = summary_lines(trace)
    assert len(lines) == 2 and all("output_error" in line for line in lines)
    assert all(not math.isnan(c.output_error) and c.output_error <= 1e-5 for c in trace.calls)
    with pytest.raises(ScriptFailed) as failed:
        run_script(script, ["--fail"], tmp_path / "f.trace")
    assert failed.value.output == (tmp_path / "f.trace").resolve() and len(failed.value.trace.calls) == 2
    assert "RuntimeError: the script broke" in failed.value.details
    (tmp_path / "quiet.py").write_text("x = 1\n")
    with pytest.raises(NoCallsCaptured, match="no attention call was captured"):
        run_script(tmp_path / "quiet.py")
    with pytest.raises(ValueError, match="is not a file"):
        run_script(tmp_path)


def test_the_command_needs_no_streamlit(script, tmp_path, monkeypatch, capsys):
    from attnviz.app import cli

    monkeypatch.setitem(sys.modules, "streamlit", None)  # any import of Streamlit would fail
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as done:
        cli.main(["trace", "tiny_gpt.py", "-o", "z.trace"])
    assert done.value.code == 0
    assert capsys.readouterr().out.splitlines()[-1].startswith("wrote 2 attention calls to ")
