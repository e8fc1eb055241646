"""A tiny run of scripts/benchmark.py, so the benchmark command keeps working (its numbers are not asserted:
timings belong in docs/PERFORMANCE.md, not in tests)."""

import importlib.util
import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_benchmark_quick_run_writes_every_section(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--repeats", "1", "--json", str(out)]) == 0
    results = json.loads(out.read_text())
    assert [len(results[k]) for k in ("scores", "output", "views", "memory")] == [2, 4, 2, 1]
    assert all(r["ratio"] > 0 for r in results["scores"] + results["output"])
    assert all(r["lean_ratio"] > 0 for r in results["scores"])
    assert all(r["payload_bytes"] < 2 * 2**20 for r in results["views"])
    long = results["long"]  # section 5: the Long sequences statistics pass (scripts/bench_long.py)
    assert {r["kind"] for r in long} == {"stream", "page", "payload"}
    assert all(r["fused_s"] > 0 for r in long if r["kind"] == "stream")
    assert all(r["bytes"] < 2 * 2**20 for r in long if r["kind"] == "payload")
    printed = capsys.readouterr().out
    assert "| t | heads | kv heads | reference | torch (s) | attnviz full record (s) | ratio |" in printed


def test_benchmark_hog_measures_quiet_and_busy_ratios(tmp_path, capsys):
    """--hog times section 1 again beside a CPU-bound process and reports both ratios and their quotient."""
    spec = importlib.util.spec_from_file_location("benchmark", ROOT / "scripts" / "benchmark.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    assert bench.main(["--quick", "--repeats", "1", "--sections", "1", "--hog", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["scores"]
    assert len(rows) == 2 and all(r["busy_lean_ratio"] > 0 and r["robustness"] > 0 for r in rows)
    printed = capsys.readouterr().out
    assert "| busy ratio | busy / quiet |" in printed
