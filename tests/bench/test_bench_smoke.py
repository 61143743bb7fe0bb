"""Each bench script runs and prints its table (a smoke run: tiny sizes, not timed).

The figures themselves come from full runs (README "Performance")."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

SMOKE = {
    "queue_core": ["--requests", "2000"],
    "claim_depth": ["--depths", "1000,5000", "--samples", "5"],
    "retention": ["--requests", "4000", "--chunk", "2000"],
    "dispatcher": ["--requests", "200"],
    "http_submit": ["--seconds", "1", "--warmup", "0.3", "--connections", "8", "--bulk-size", "1000"],
    "wakeup": ["--samples", "10"],
    "batching": ["--models", "echo,torch-mlp", "--seconds", "0.5", "--echo-requests", "2000", "--repeat", "1"],
    "peers": ["--quick"],
    "pipeline_overhead": ["--runs", "5", "--loaded-runs", "30", "--fan-out", "20"],
}


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_bench_script_prints_its_table(script: str, server_url: str) -> None:
    if script == "batching":
        pytest.importorskip("torch")
    env = dict(os.environ, DATABASE_URL=server_url)
    done = subprocess.run([sys.executable, "-m", f"bench.{script}", *SMOKE[script]], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    # a heading, the machine line (cores) and a table
    assert "\n## " in "\n" + done.stdout and " cores" in done.stdout and "|---" in done.stdout, done.stdout
