"""benchmarks/vs_trl.py: its pure pieces on hand-made inputs, and its smallest setting end to end (TRL's
GRPOTrainer, lit_dash without filtering and with DASH, on the tiny model; skipped without TRL)."""

from __future__ import annotations

import json
import subprocess
import sys
from fractions import Fraction
from pathlib import Path

import pytest
from support import REPO, cli_env


def _bench():
    if str(REPO / "benchmarks") not in sys.path:
        sys.path.insert(0, str(REPO / "benchmarks"))
    import vs_trl

    return vs_trl


# ------------------------------------------------------------------------------------- the pure pieces


@pytest.mark.parametrize(
    "text,read,right",
    [
        ("23 + 73 = 96, so \\boxed{96}.", "96", True),
        ("\\boxed{23 + 73}", "73", False),  # the last number in the box, not its value
        ("\\boxed{96} and later 12", "96", True),  # the box wins over later text
        ("no box: 23 + 73 = 96", "96", True),  # else the last number of the text
        ("\\boxed{96.0}", "96", True),  # compared by value
        ("first \\boxed{96}, then \\boxed{95}", "95", False),  # the last box
        ("no number at all", None, False),
    ],
)
def test_the_scorer_reads_the_plain_rule(text, read, right):
    record = _bench().score_record("What is 23 + 73?", text)
    assert record["reference"] == 96 and record["completion"] == text
    assert record["read"] == read and record["right"] is right
    assert read is None or Fraction(record["read"]) == Fraction(read)


def test_summary_and_table_on_hand_made_records():
    bench = _bench()
    trl = bench.summarize(
        {"setting": "trl", "step_seconds": [10.0, 12.0, 8.0, 10.0], "process_wall_s": 95.4},
        {0: {"accuracy": 0.1}, 2: {"accuracy": 0.25}, 4: {"accuracy": 0.5}},
    )
    assert trl["train_seconds"] == {0: 0.0, 2: 22.0, 4: 40.0}
    assert trl["s_per_step"] == 10.0 and trl["train_s"] == 40.0
    assert trl["accuracy"] == {0: 0.1, 2: 0.25, 4: 0.5}
    dash = bench.summarize(
        {"setting": "lit_dash_dash", "step_seconds": [5.0, 6.0], "process_wall_s": 50.0},
        {0: {"accuracy": 0.1}, 2: {"accuracy": 0.3}},
    )
    text = bench.table([trl, dash]).splitlines()
    assert text[0] == "| setting | acc@0 | acc@2 | acc@4 | s/step | train s | total s |"
    assert text[2] == "| trl | 0.100 | 0.250 | 0.500 | 10.0 | 40 | 95 |"
    assert text[3] == "| lit_dash_dash | 0.100 | 0.300 | - | 5.5 | 11 | 50 |"  # not scored at 4: "-"
    assert bench.accuracy_of([{"right": True}, {"right": False}, {"right": False}, {"right": True}]) == 0.5
    assert bench.scored_steps(5, 2) == [0, 2, 4, 5] and bench.scored_steps(4, 4) == [0, 4]


def _payload(seed: int, accuracy: dict, step_seconds: dict) -> dict:
    """A vs_trl.json as one seed's run writes it (JSON: string step keys)."""
    results = []
    for setting, acc in accuracy.items():
        steps = step_seconds[setting]
        run = _bench().summarize(
            {"setting": setting, "step_seconds": steps, "process_wall_s": sum(steps) + 5},
            {s: {"accuracy": a} for s, a in acc.items()},
        )
        results.append(json.loads(json.dumps(run)))
    settings = {"model": "m", "prompts": 2, "group_size": 4, "max_new_tokens": 8, "lr": 1e-5}
    settings |= {"precision": "float32", "seed": seed}
    return {"settings": settings, "machine": {}, "held_out": {"questions": 10}, "results": results}


def test_seeds_are_combined_by_hand(tmp_path):
    bench = _bench()
    runs = {
        0: _payload(0, {"trl": {0: 0.1, 2: 0.3, 4: 0.5}, "lit_dash_dash": {0: 0.1, 2: 0.5, 4: 0.6}},
                    {"trl": [10.0] * 4, "lit_dash_dash": [2.0] * 4}),
        1: _payload(1, {"trl": {0: 0.1, 2: 0.2, 4: 0.4}, "lit_dash_dash": {0: 0.1, 2: 0.4, 4: 0.7}},
                    {"trl": [12.0] * 4, "lit_dash_dash": [3.0] * 4}),
    }  # fmt: skip
    for seed, payload in runs.items():
        (tmp_path / f"seed{seed}").mkdir()
        (tmp_path / f"seed{seed}" / "vs_trl.json").write_text(json.dumps(payload))
    text = bench.combine_seeds(tmp_path, [0, 1]).splitlines()
    # means: trl 10/25/45%, dash 10/45/65%; s/step 11 and 2.5; the target is the lower final mean, 45%:
    # trl reaches it at step 4 (4 x 11 = 44 s), dash at step 2 (2 x 2.5 = 5 s): 5 / 44 of TRL's time
    assert text[0] == "| setting | acc@0 | acc@2 | acc@4 | s/step | train s | s to 45.0% | vs TRL |"
    assert text[2] == "| trl | 10.0% (10 / 10) | 25.0% (30 / 20) | 45.0% (50 / 40) | 11.0 | 44 | 44 | 1.00 |"
    assert (
        text[3]
        == f"| lit_dash_dash | 10.0% (10 / 10) | 45.0% (50 / 40) | 65.0% (60 / 70) | 2.5 | 10 | 5 | {5 / 44:.2f} |"
    )
    saved = json.loads((tmp_path / "vs_trl_seeds.json").read_text())
    assert saved["target_accuracy"] == pytest.approx(0.45)
    assert saved["time_to_target"] == {"trl": pytest.approx(44.0), "lit_dash_dash": pytest.approx(5.0)}
    assert (tmp_path / "vs_trl_seeds.png").read_bytes()[:4] == b"\x89PNG"
    # runs that differ in more than the seed are refused, and so is a missing seed
    runs[1]["settings"]["lr"] = 2e-5
    (tmp_path / "seed1" / "vs_trl.json").write_text(json.dumps(runs[1]))
    with pytest.raises(SystemExit, match="differ in more than the seed"):
        bench.combine_seeds(tmp_path, [0, 1])
    with pytest.raises(SystemExit, match="seed2/vs_trl.json not found"):
        bench.combine_seeds(tmp_path, [0, 2])
    assert bench.parse_args(["--seeds", "0,1"]).seeds == [0, 1]
    with pytest.raises(SystemExit):
        bench.parse_args(["--combine-only"])


def test_both_setups_get_the_shared_knobs(tmp_path):
    bench = _bench()
    argv = ["--prompts", "3", "--group-size", "4", "--micro-batch", "6", "--steps", "5", "--eval-every", "2"]
    args = bench.parse_args([*argv, "--lr", "1e-5", "--seed", "7", "--", "--trainer.x", "1"])
    assert (
        args.fit_args == ["--trainer.x", "1"]
        and args.instruction == "Put your final answer within \\boxed{}."
    )
    trl = bench.trl_config_kwargs(args, tmp_path)
    assert (trl["num_generations"], trl["per_device_train_batch_size"]) == (4, 6)
    assert trl["gradient_accumulation_steps"] == trl["steps_per_generation"] == 2  # 12 completions a step
    assert (trl["loss_type"], trl["beta"], trl["scale_rewards"], trl["num_iterations"]) == (
        "dr_grpo",
        0.0,
        "group",
        1,
    )
    assert (trl["shuffle_dataset"], trl["use_vllm"], trl["bf16"], trl["seed"]) == (False, False, False, 7)
    assert trl["lr_scheduler_type"] == "constant" and trl["max_steps"] == 5
    for setting, threshold in (("lit_dash_no_filter", None), ("lit_dash_dash", 0.1)):
        cfg = bench.lit_dash_config(args, setting, tmp_path)
        data, model = cfg["data"], cfg["model"]["init_args"]
        assert data["filter_threshold"] == threshold and cfg["seed_everything"] == 7
        assert (data["prompts_per_rollout"], data["group_size"], data["micro_batch_size"]) == (3, 4, 6)
        assert data["sampling"]["max_new_tokens"] == trl["max_completion_length"]
        assert data["sampling"]["temperature"] == trl["temperature"] == 1.0
        assert model["lr"] == trl["learning_rate"] == 1e-5 and model["lr_schedule"] == "constant"
        assert (model["loss_agg"], model["kl_coef"], model["answer_fallback"]) == ("constant", 0.0, True)
        assert model["precision"] == data["engine"]["dtype"] == "float32"
        assert cfg["trainer"]["max_steps"] == 5
        saver = cfg["trainer"]["callbacks"][0]["init_args"]
        assert saver["every_n_train_steps"] == 2 and saver["save_top_k"] == -1
    bf16 = bench.parse_args([*argv, "--precision", "bfloat16"])
    assert bench.trl_config_kwargs(bf16, tmp_path)["bf16"] is True
    assert bench.lit_dash_config(bf16, "lit_dash_dash", tmp_path)["data"]["engine"]["dtype"] == "bfloat16"
    with pytest.raises(SystemExit, match="must divide"):
        bench.trl_config_kwargs(
            bench.parse_args(["--prompts", "3", "--group-size", "4", "--micro-batch", "5"]), tmp_path
        )


def test_the_prompt_order_is_lit_dashs_stream():
    from lit_dash.data.prompt_stream import PromptStream
    from lit_dash.data.records import Problem

    problems = [Problem(question=f"What is {i} + 1?", answer=str(i + 1), source_id=str(i)) for i in range(10)]
    order = _bench().prompt_order(problems, 3, seed=7, steps=5)  # 3 batches an epoch: into the second
    stream = iter(PromptStream(problems, 3, 7))
    assert order == [next(stream) for _ in range(5)]
    assert len({p.source_id for batch in order[:3] for p in batch}) == 9  # an epoch: no problem twice


def test_sample_questions_reads_completion_samples_text():
    rows = [
        f"**prompt** {q}  \n**reference** 1  \n**reward** 0 | **advantage** +0.00  \n```\nsome text\n```"
        for q in ("What is 10 + 20?", "What is 33 + 44?")
    ]
    text = "\n\n---\n\n".join(rows)
    assert _bench().sample_questions(text) == ["What is 10 + 20?", "What is 33 + 44?"]


# ------------------------------------------------------------------------------------------ end to end


def test_vs_trl_smallest_setting_end_to_end(tmp_path):
    trl = pytest.importorskip(
        "trl",
        reason="TRL is the optional `bench` extra (pip install -e '.[bench]'), not in the default install",
    )
    import torch
    import transformers

    out = tmp_path / "vs_trl"
    cmd = [
        sys.executable,
        "benchmarks/vs_trl.py",
        "--model",
        "tiny-llama",
        "--steps",
        "2",
        "--eval-every",
        "1",
    ]
    cmd += ["--prompts", "2", "--group-size", "4", "--micro-batch", "4", "--max-new-tokens", "8"]
    cmd += ["--eval-max-new-tokens", "8", "--eval-problems", "4", "--out", str(out)]
    cmd += ["--", "--data.engine.kv_cache_gib", "0.25"]
    proc = subprocess.run(cmd, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    payload = json.loads((out / "vs_trl.json").read_text())
    rows = payload["results"]
    assert [r["setting"] for r in rows] == ["trl", "lit_dash_no_filter", "lit_dash_dash"]
    questions = None
    for r in rows:
        assert r["order"] == "same", (r["setting"], r["questions_by_step"], payload["prompt_order"])
        assert r["questions_by_step"] == payload["prompt_order"] and len(payload["prompt_order"]) == 2
        assert sorted(r["accuracy"]) == ["0", "1", "2"] and len(r["step_seconds"]) == 2
        assert all(s > 0 for s in r["step_seconds"]) and r["process_wall_s"] > sum(r["step_seconds"])
        for step, accuracy in r["accuracy"].items():
            score = r["scores"][step]
            records = [json.loads(line) for line in Path(score["records"]).read_text().splitlines()]
            assert len(records) == score["n"] == 4
            assert accuracy == score["accuracy"] == sum(x["right"] for x in records) / 4  # the records' own
            assert score["right"] == sum(x["right"] for x in records)
            for x in records:
                assert x["right"] == (x["read"] is not None and Fraction(x["read"]) == x["reference"])
                a, b = x["question"].removeprefix("What is ").removesuffix("?").split(" + ")
                assert x["reference"] == int(a) + int(b)
            if questions is None:
                questions = [x["question"] for x in records]
            assert [x["question"] for x in records] == questions  # one held-out set for every setting
        assert r["scores"]["0"] == payload["held_out"]["base"]  # step 0: the base model, scored once
    kept = {r["setting"]: r["kept_completions"] for r in rows if r["setting"] != "trl"}
    assert kept["lit_dash_no_filter"] == [8.0, 8.0] and all(k <= 8 for k in kept["lit_dash_dash"])
    assert rows[2]["filter_threshold"] == 0.1 and rows[1]["filter_threshold"] is None
    # the table prints what the JSON holds
    for r in rows:
        cells = [
            r["setting"],
            *[f"{r['accuracy'][s]:.3f}" for s in ("0", "1", "2")],
            f"{r['s_per_step']:.1f}",
        ]
        assert any(line.startswith("| " + " | ".join(cells) + " |") for line in proc.stdout.splitlines())
    machine = payload["machine"]
    cpuinfo = Path("/proc/cpuinfo").read_text()
    flags = set(next(line for line in cpuinfo.splitlines() if line.startswith("flags")).split())
    assert machine["flags"] == {
        f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")
    }
    assert machine["precision"] == "float32"
    versions = machine["versions"]
    assert versions["torch"] == torch.__version__ and versions["transformers"] == transformers.__version__
    assert versions["trl"] == trl.__version__
    head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
    assert machine["lit_dash_commit"] == head.stdout.strip()
    png = (out / "vs_trl.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    width, height = int.from_bytes(png[16:20], "big"), int.from_bytes(png[20:24], "big")  # its IHDR
    assert width >= 800 and height >= 300, (width, height)
    assert not list((out / "runs").rglob("*.ckpt")) and not list((out / "runs").rglob("*.safetensors"))
