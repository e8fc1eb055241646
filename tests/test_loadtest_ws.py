"""CI smoke run of the protocol-level load test (scripts/loadtest.py --client ws): 5 sessions for 20 s spoken to
over Streamlit's WebSocket, against the app started as a user starts it. Every action of the classroom scenario
completes and is checked in the deltas (head panels, a changed figure, the page title), with zero errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_five_protocol_sessions_run_the_whole_scenario_without_errors(tmp_path):
    out = tmp_path / "load.json"
    cmd = [sys.executable, str(ROOT / "scripts" / "loadtest.py"), "--client", "ws", "--sessions", "5"]
    cmd += ["--duration", "20", "--warmup", "5", "--ramp", "2", "--think", "0.3", "--action-timeout", "120"]
    proc = subprocess.run(cmd + ["--json", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.exists(), proc.stdout + proc.stderr
    summary = json.loads(out.read_text())
    assert summary["error_count"] == 0, (summary["errors"], summary["error_samples"], proc.stdout)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert summary["scenarios_completed"] >= 5, proc.stdout  # each session got through open..back at least once
    for action in ("open", "heads", "mask", "mask_lab", "back"):
        row = summary["actions"][action]
        assert row["count"] >= 5 and 0 < row["p50_s"] <= row["p95_s"] <= row["max_s"], (action, row)
    assert summary["cpu"]["client"] == "ws" and summary["cpu"]["server_s"] > 0
    assert summary["rss_mb"]["peak"] >= summary["rss_mb"]["start"] > 0
