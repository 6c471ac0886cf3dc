"""The DASH-vs-GRPO benchmark runs end to end on the tiny model (real vLLM) and reports what it claims."""

from __future__ import annotations

import csv
import json
import math
import re
import subprocess
import sys

import pytest
from figures import drawn_colours
from support import REPO, cli_env


def test_dash_vs_grpo_reports_table_plot_and_ratio(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, "benchmarks/dash_vs_grpo.py", "--model", "tiny-llama", "--settings", "grpo,dash"]
    cmd += ["--steps", "1", "--prompts", "2", "--group-size", "4", "--micro-batch", "4"]
    cmd += ["--max-new-tokens", "8", "--kv-cache-gib", "0.25", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=cli_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert re.fullmatch(r"DASH/GRPO time ratio: \d+\.\d\d", lines[-1])
    assert any(line.startswith("| grpo | 2 |") for line in lines)  # 2 prompts, 1 per engine call
    assert any(line.startswith("| dash | 1 |") for line in lines)  # one preemptive call
    results = {r["setting"]: r for r in json.loads((out / "results.json").read_text())["results"]}
    assert results["grpo"]["kept_fraction"] == 1.0  # no filtering in standard GRPO
    assert results["dash"]["filter_threshold"] == 0.1
    for r in results.values():
        assert sum(r["phases"].values()) == pytest.approx(r["total_s_per_step"], rel=1e-6)
        # the timing CSV holds the one step the figures are the mean of (what TimingProfile wrote)
        with open(r["timing_csv"]) as f:
            (row,) = [{k: float(v) for k, v in line.items()} for line in csv.DictReader(f)]
        assert row["step"] == 1.0
        assert row["total"] == pytest.approx(r["total_s_per_step"], rel=1e-5)
        assert {p: row[p] for p in r["phases"]} == pytest.approx(r["phases"], rel=1e-5, abs=1e-6)
        assert row["generation"] > 0  # every setting samples (a tiny rollout may keep nothing to train)
    png = (out / "dash_vs_grpo.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")  # its IHDR
    assert width >= 600 and height >= 300, (width, height)
    assert drawn_colours(out / "dash_vs_grpo.png") >= 4  # bars in several phase colours, not a blank page


def test_drawn_colours_tells_a_drawn_figure_from_an_empty_one(tmp_path):
    """The negative control of the figure checks: an axes frame with a title counts no colour, the same
    axes with two coloured bars count at least two."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    ax.set_title("nothing drawn")
    fig.savefig(tmp_path / "empty.png")
    ax.bar([0, 1], [1, 2], color=["tab:blue", "tab:orange"])
    fig.savefig(tmp_path / "bars.png")
    plt.close(fig)
    assert drawn_colours(tmp_path / "empty.png") == 0
    assert drawn_colours(tmp_path / "bars.png") >= 2  # (their antialiased edges may add blends)


def test_logprob_memory_benchmark_smoke(tmp_path):
    """Small shapes: each configuration runs in its own process and reports its peak; the chunked one adds
    far less than the unchunked one, and an unchunked one over the memory budget is skipped, not run."""
    out = tmp_path / "logprob_memory.json"
    cmd = [sys.executable, "benchmarks/logprob_memory.py", "--vocab", "20000", "--rows", "2", "--prompt", "8"]
    cmd += ["--completions", "128,1024", "--chunks", "0,32", "--max-unchunked-gib", "0.1", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=cli_env())
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


def test_prompt_skipping_benchmark_reads_runs_and_finds_the_time_to_the_target(tmp_path):
    """The script's own logic on hand-made run records (a real pair of runs takes minutes): cumulative
    train time without evaluation, summed counts, the first evaluation at the no-skip final accuracy."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import prompt_skipping as bench

    timing = [  # seconds per step; evaluation time is not train time
        {"step": 1.0, "total": 10.0, "evaluation": 0.0},
        {"step": 2.0, "total": 14.0, "evaluation": 4.0},
        {"step": 3.0, "total": 8.0, "evaluation": 0.0},
        {"step": 4.0, "total": 9.0, "evaluation": 3.0},
    ]
    scalars = {
        "eval/arithmetic/accuracy": [(0, 0.1), (2, 0.4), (4, 0.5)],
        "train/sampled_completions": [(0, 16.0), (1, 12.0), (2, 8.0), (3, 8.0)],
        "train/skipped_completions": [(0, 0.0), (1, 4.0), (2, 8.0), (3, 8.0)],
        "train/skipped_prompts": [(0, 0.0), (1, 1.0), (2, 2.0), (3, 2.0)],
    }
    skip = bench.summarize_run(scalars, timing, "eval/arithmetic/accuracy")
    assert skip["train_seconds"] == {0: 0.0, 2: 20.0, 4: 34.0}
    assert (skip["completions_generated"], skip["samples_saved"], skip["skipped_prompts"]) == (44, 20, 5)
    no_skip = bench.summarize_run(
        {"eval/arithmetic/accuracy": [(0, 0.1), (2, 0.3), (4, 0.4)]},
        [{**r, "total": r["total"] + 5} for r in timing],
        "eval/arithmetic/accuracy",
    )
    rows = bench.compare({("skip", 0): skip, ("no_skip", 0): no_skip})
    assert [r["setting"] for r in rows] == ["no_skip", "skip"]
    assert rows[0]["reached_target_at"] == {"step": 4, "train_s": 54.0}  # its own final accuracy
    assert rows[1]["target_accuracy"] == 0.4 and rows[1]["reached_target_at"] == {"step": 2, "train_s": 20.0}
    assert bench.time_to_reach(skip, 0.9) is None
    text = bench.table(rows)
    assert "| skip | 0 | 0.100 | 0.400 | 0.500 | 20 | 34 | 44 | 20 | 20 (step 2) |" in text
    cmd = bench.fit_command(bench.parse_args(["--seeds", "3", "--", "--x", "1"]), "skip", 3, tmp_path)
    assert cmd[-4:] == ["--data.prompt_skipping", '{"history": 2, "explore": 0.2}', "--x", "1"]
    assert "--seed_everything" in cmd and cmd[cmd.index("--data.train.num_problems") + 1] == "36"


def test_kl_scope_benchmark_reads_its_runs(tmp_path):
    """kl_scope's own logic on hand-made run records: train time without evaluation, the per-step means
    (forward+backward with the reference's pass), and the command of each setting."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import kl_scope as bench

    timing = [
        {"step": 1.0, "total": 10.0, "evaluation": 0.0, "forward_backward": 4.0, "ref_old_logprobs": 1.0},
        {"step": 2.0, "total": 14.0, "evaluation": 4.0, "forward_backward": 6.0, "ref_old_logprobs": 1.0},
    ]
    scalars = {
        "eval/arithmetic/accuracy": [(0, 0.1), (2, 0.4)],
        "train/kept_completions": [(0, 40.0), (1, 60.0)],
        "train/sampled_completions": [(0, 96.0), (1, 96.0)],
        "train/micro_batches": [(0, 3.0), (1, 4.0)],
        "train/kl_effective_coef": [(0, 0.04 * 40 / 96), (1, 0.04 * 60 / 96)],
        "train/kl": [(0, 0.0), (1, 0.002)],
        "train/completion_tokens_mean": [(0, 20.0), (1, 16.0)],
    }
    run = bench.summarize_run(scalars, timing, "eval/arithmetic/accuracy")
    assert run["train_seconds"] == {0: 0.0, 2: 20.0} and run["step_s_mean"] == 10.0
    assert run["forward_backward_s_mean"] == 6.0 and run["micro_batches_mean"] == 3.5
    assert run["kl_effective_coef_mean"] == pytest.approx(0.04 * 50 / 96) and run["kl_last"] == 0.002
    assert (
        "| kept | 0 | 0.10 | 0.40 | 20 | 10.0 | 6.0 | 3.5 | 50 / 96 | 0.0208 | 0.0020 | 18.0 |"
        in bench.table([{**run, "setting": "kept", "seed": 0}])
    )
    cmd = bench.fit_command(bench.parse_args(["--", "--x", "1"]), "sampled", 1, tmp_path)
    assert cmd[-6:] == [
        "--model.init_args.kl_coef",
        "0.04",
        "--model.init_args.kl_over",
        "sampled",
        "--x",
        "1",
    ]


PHASES = (
    "generation", "forward+backward", "forward+backward MFU", "forward+backward, per row",
    "forward+backward, shared prefix", "weight sync", "checkpoint",
)  # fmt: skip


def test_efficiency_benchmark_smoke(tmp_path, tiny_model_path):
    """Two settings of the demo's step on the tiny model: every phase has a positive, finite ratio to its
    limit, the bare loop trained the per-row layout's tokens and lit_dash each prompt once, MFU is a
    fraction of the measured peak, and the byte counts are those of the model (sync) and of model + AdamW
    moments (checkpoint)."""
    from transformers import AutoModelForCausalLM

    out = tmp_path / "efficiency.json"
    cmd = [sys.executable, "benchmarks/efficiency.py", "--model", "tiny-llama", "--prompts", "2"]
    cmd += ["--long-prompts", "2", "--group-size", "4", "--micro-batch", "4", "--max-new-tokens", "8,16"]
    cmd += ["--steps", "1", "--sync-repeats", "1", "--checkpoint-repeats", "1"]
    cmd += ["--work-dir", str(tmp_path), "--out", str(out)]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600, env=cli_env())
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    settings = [r["setting"] for r in report["results"]]
    assert settings == ["demo", "16 new tokens"]
    printed = [
        line for line in proc.stdout.splitlines() if line.startswith(("| demo |", "| 16 new tokens |"))
    ]
    assert [line.split(" | ")[1] for line in printed] == list(PHASES) * 2
    assert [(r["setting"], r["phase"]) for r in report["table"]] == [(s, p) for s in settings for p in PHASES]
    for row in report["table"]:
        for key in ("lit_dash", "limit", "ratio"):
            assert math.isfinite(row[key]) and row[key] > 0, row
    from lit_dash.hardware import cpu_has_native_bf16

    expected = "bfloat16" if cpu_has_native_bf16() else "float32"  # the demo's precision: auto
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    state_elements = sum(t.numel() for t in model.state_dict().values())  # tied: the embedding twice
    param_bytes = sum(p.numel() * 4 for p in model.parameters())  # fp32 master weights; tied: once
    for result in report["results"]:
        fb = result["forward_backward"]
        assert result["completions"] == 2 * 4  # filter off: every completion trained
        # the bare loop runs one row per completion; lit_dash (model.shared_prefix, the default) each prompt once
        lay = fb["layouts"]
        assert fb["bare_trained_tokens"] == fb["model_flops"]["trained_tokens"] == lay["tokens"]["per_row"]
        assert fb["lit_dash_trained_tokens"] == lay["tokens"]["shared_prefix"]
        assert fb["bare_completion_tokens"] == fb["model_flops"]["completion_tokens"] > 0
        # the layout rows: the same completions, each prompt once when packed (4 completions a group)
        assert lay["completions"] == result["completions"]
        prompt_tokens = lay["tokens"]["per_row"] - fb["bare_completion_tokens"]  # each prompt 4 times
        assert lay["tokens"]["shared_prefix"] == lay["tokens"]["per_row"] - prompt_tokens * 3 // 4 > 0
        assert set(lay["seconds"]) == {"bare_per_row", "lit_dash_per_row", "lit_dash_shared_prefix"}
        assert 0 < fb["lit_dash_mfu"] <= 1 and 0 < fb["bare_mfu"] <= 1
        assert fb["matmul_peak"]["peak_gflops"] == max(fb["matmul_peak"]["gflops"].values())
        # the push is cast to the engine's dtype first: 2 bytes an element into a bf16 engine, 4 into fp32
        assert result["weight_sync"]["engine_dtype"] == expected
        assert result["weight_sync"]["bytes"] == state_elements * (2 if expected == "bfloat16" else 4)
        assert result["checkpoint"]["bytes"] > 3 * param_bytes  # weights + AdamW's two moments
        assert result["generation"]["limit_setting"] in result["generation"]["plain"]
    machine = report["machine"]
    # the flags the report names are this CPU's, read here from /proc/cpuinfo on its own
    with open("/proc/cpuinfo") as f:
        words = set(next((line for line in f if line.startswith("flags")), "").split())
    assert machine["precision"] == expected
    assert machine["flags"] == {flag: flag in words for flag in machine["flags"]}
    assert len(report["where_the_gap_is"]) == 2
    assert all("The largest gap:" in p for p in report["where_the_gap_is"])
