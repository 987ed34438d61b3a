"""The dashboard under a small load, with the benchmark's own code (benchmarks/dashboard_load.py):
two sessions uploading at once see only their own results, and sessions closed mid-upload
leave no traceback in the server log."""

from pathlib import Path

import pytest

from benchmarks.dashboard_load import CHROMIUM, log_problems, run_load_benchmark
from test_dashboard_logic import write_tiny_run

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.is_file(), reason=f"{CHROMIUM} not found (Debian: apt-get install chromium)"),
]


def test_two_sessions_are_isolated_and_closing_tabs_leaves_a_clean_log(tmp_path):
    model = write_tiny_run(tmp_path / "runs", "tiny-resnet18", overrides={"image_size": 64})
    results = run_load_benchmark(model, sessions=(2,), cycles=4, valid_per_session=1, timeout=300)
    [row] = results["rows"]
    assert row["sessions"] == 2 and row["files"] == 6  # per session: one valid, one corrupt, one oversized
    assert row["errors"] == [] and row["leaks"] == []
    assert results["cycles"]["errors"] == []
    assert results["log_problems"] == []
    print(f"\n2 sessions: upload-to-result {row['latency_s']}; 4 open/close cycles in {results['cycles']['wall_s']} s")


def test_log_problems_finds_tracebacks_and_unhandled_task_errors():
    log = ("2026-12-01 10:00:00 WebSocket connection opened\n"
           "Task exception was never retrieved\nfuture: <Task finished ...>\n"
           "Traceback (most recent call last):\n  File x\nValueError: boom\n"
           "2026-12-01 10:00:01 a browser session closed while the server was sending it an update\n")
    problems = log_problems(log)
    assert len(problems) == 2 and problems[0].startswith("Task exception") and "File x" in problems[1]
    assert log_problems("2026-12-01 WebSocket connection closed: code=1001, reason=None\n") == []
