"""The DASH-vs-GRPO benchmark runs end to end on the tiny model (real vLLM) and reports what it claims."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.engine
def test_dash_vs_grpo_reports_table_plot_and_ratio(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "benchmarks/dash_vs_grpo.py", "--model", "tiny-llama", "--settings", "grpo,dash"]
    cmd += ["--steps", "1", "--prompts", "2", "--group-size", "4", "--micro-batch", "4"]
    cmd += ["--max-new-tokens", "8", "--kv-cache-gib", "0.25", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"DASH/GRPO time ratio: \d+\.\d\d", lines[-1])
    assert any(line.startswith("| grpo | 2 |") for line in lines)  # 2 prompts, 1 per engine call
    assert any(line.startswith("| dash | 1 |") for line in lines)  # one preemptive call
    results = {r["setting"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert results["grpo"]["kept_fraction"] == 1.0  # no filtering in standard GRPO
    assert results["dash"]["filter_threshold"] == 0.1
    for r in results.values():
        assert Path(r["timing_csv"]).is_file()
        assert sum(r["phases"].values()) == pytest.approx(r["total_s_per_step"], rel=1e-6)
    assert (out / "dash_vs_grpo.png").stat().st_size > 10_000


def test_logprob_memory_benchmark_smoke(tmp_path):
    """Small shapes: each configuration runs in its own process and reports its peak; the chunked one adds
    far less than the unchunked one, and an unchunked one over the memory budget is skipped, not run."""
    out = tmp_path / "logprob_memory.json"
    cmd = [sys.executable, "benchmarks/logprob_memory.py", "--vocab", "20000", "--rows", "2", "--prompt", "8"]
    cmd += ["--completions", "128,1024", "--chunks", "0,32", "--max-unchunked-gib", "0.1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "| 128 | 256 | unchunked |" in proc.stdout and "| 128 | 256 | 32 |" in proc.stdout
    rows = {(r["completion_tokens"], r["chunk_tokens"]): r for r in json.loads(out.read_text())["results"]}
    assert set(rows) == {(128, 0), (128, 32), (1024, 0), (1024, 32)}
    assert rows[128, 0]["tokens"] == rows[128, 32]["tokens"] == 256
    # unchunked: 256 tokens x 20000 x 4 bytes = 20 MiB per float32 copy of the logits, several of them
    assert rows[128, 0]["peak_added_mib"] > 40
    assert rows[128, 32]["peak_added_mib"] < rows[128, 0]["peak_added_mib"] / 3
    assert "skipped" in rows[1024, 0] and "seconds" not in rows[1024, 0]  # 5 x 2048 x 20000 x 4 B > 0.1 GiB
    assert rows[1024, 32]["seconds"] > 0
