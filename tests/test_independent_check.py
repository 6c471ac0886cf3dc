"""An independent check of what lit_dash reports: train the real 135M model briefly (the demo's settings),
export the final checkpoint's weights to a plain transformers folder, score them with plain vLLM and a
plain answer rule (scripts/independent_check.py, which uses no lit_dash reward or engine code) on the same
held-out problems, and compare with lit_dash's own evaluation at the final step.
"""

from __future__ import annotations

import importlib.util
import json
import math
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from support import REPO, cli_env, restore_engine_weights, session_engine_for_the_cli

SCRIPT = REPO / "scripts" / "independent_check.py"


def _script():
    spec = importlib.util.spec_from_file_location("independent_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------- the script's plain parts


@pytest.mark.parametrize(
    "text,expected",
    [
        ("23 + 73 = 96. The answer is \\boxed{96}.", 96),
        ("\\boxed{23 + 73}", 73),  # the hack reads as its last number: wrong, as the strict reward says
        ("\\boxed{1,096}", 1096),
        ("\\boxed{\\text{96}} and then 5", 96),  # the box wins over later text
        ("first \\boxed{12}, finally \\boxed{\\frac{1}{2} 40}", 40),
        ("no box: 23 + 73 = 96", 96),
        ("cut off \\boxed{9", 9),  # an unclosed box is no box: the last number of the text
        ("\\boxed{} nothing", None),
        ("no numbers", None),
    ],
)
def test_the_plain_rule(text, expected):
    assert _script().plain_answer(text) == expected


def test_fresh_problems_are_held_out_from_every_train_split():
    from lit_dash.data.sources import _arith_split, arithmetic_problems

    script = _script()
    questions = [f"What is {a} + {b}?" for a in range(10, 100) for b in range(10, 100)]
    # the script's copy of the partition is lit_dash's, question for question
    assert [script.held_out_half(q) for q in questions] == [_arith_split(q) == "test" for q in questions]
    eval_set = {p.question for p in arithmetic_problems(100, 1, "add2", split="test")}  # the demo's
    fresh = script.fresh_additions(300, seed=12345, exclude=eval_set)
    assert len({q for q, _ in fresh}) == 300 and fresh == script.fresh_additions(300, 12345, eval_set)
    assert not {q for q, _ in fresh} & eval_set
    train = {p.question for p in arithmetic_problems(4000, 0, "add2", split="train")}
    assert not {q for q, _ in fresh} & train
    assert all(ref == int(q.split()[2]) + int(q.split()[4].rstrip("?")) for q, ref in fresh)


# --------------------------------------------------------------------------------------- end to end

STEPS = 2


def _short_demo(root: Path) -> Path:
    """configs/demo.yaml, shortened: 2 steps of 8 prompts x 8, 50 eval problems at steps 0 and 2, fp32."""
    config = yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())
    trainer = config["trainer"]
    trainer.update(max_steps=STEPS, default_root_dir=str(root), enable_progress_bar=False)
    trainer["callbacks"] = [
        {
            "class_path": "lit_dash.callbacks.StepCheckpoint",
            "init_args": {"every_n_train_steps": STEPS, "save_last": True},
        },
        {"class_path": "lit_dash.callbacks.MathEvaluation", "init_args": {"every_n_steps": STEPS}},
        {"class_path": "lit_dash.callbacks.RewardAudit"},
    ]
    data = config["data"]
    data["prompts_per_rollout"] = 8
    data["eval_sets"]["arithmetic"]["num_problems"] = 50
    data["engine"]["kv_cache_gib"] = 0.5
    # pinned to fp32 as the scorer is: with precision auto a bf16-native CPU would train and evaluate in
    # bf16, and greedy text from a bf16 engine differs from an fp32 one on the same weights
    config["model"]["init_args"]["precision"] = "float32"
    data["engine"]["dtype"] = "float32"
    path = root / "short_demo.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_plain_vllm_on_the_final_checkpoint_agrees_with_lit_dash(tmp_path, smollm2_engine, smollm2_path):
    from lit_dash.callbacks import MathEvaluation, RewardAudit
    from lit_dash.cli import build_cli

    start = time.perf_counter()
    try:  # the fit runs on the session's fp32 135M engine (no second one), which gets its weights back
        with session_engine_for_the_cli(smollm2_engine):
            cli = build_cli(["fit", "--config", str(_short_demo(tmp_path))])
    finally:
        restore_engine_weights(smollm2_engine, smollm2_path)
    trainer = cli.trainer
    assert trainer.global_step == STEPS
    assert cli.model.hparams.require_final_form  # the demo's reward is the strict one
    evaluation = next(c for c in trainer.callbacks if isinstance(c, MathEvaluation))
    assert [step for step, _ in evaluation.history] == [0, STEPS]
    first, final = evaluation.history[0][1], evaluation.history[-1][1]
    fit_seconds = time.perf_counter() - start

    # the reward audit's negative control: the strict reward pays no unevaluated or restated answer
    audit = next(c for c in trainer.callbacks if isinstance(c, RewardAudit))
    assert len(audit.history) == STEPS
    for step, metrics in audit.history:
        assert metrics.get("audit/unevaluated_fraction", 0.0) == 0.0, (step, metrics)
        assert metrics.get("audit/restated_fraction", 0.0) == 0.0, (step, metrics)

    lit_file = Path(trainer.log_dir) / "eval" / f"arithmetic_fit_step{STEPS}.jsonl"
    lit_rows = [json.loads(line) for line in lit_file.read_text().splitlines()]
    start_rows = [json.loads(line) for line in lit_file.with_name("arithmetic_fit_step0.jsonl").open()]
    assert (tmp_path / "checkpoints" / "last.ckpt").exists()
    del cli, trainer

    out = tmp_path / "check.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path), "--questions-from", str(lit_file)]
        + ["--json-out", str(out), "--kv-cache-gib", "0.25"],
        capture_output=True,
        text=True,
        timeout=600,
        env=cli_env(),
    )
    assert out.exists(), (
        f"independent_check.py failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr[-4000:]}"
    )
    report = json.loads(out.read_text())
    plain = report["records"]
    n = len(plain)
    assert n == len(lit_rows) == 50 and report["summary"]["step"] == STEPS
    assert [r["question"] for r in plain] == [r["question"] for r in lit_rows]
    assert [r["prompt"] for r in plain] == [r["prompt"] for r in lit_rows]  # the same prompt text
    assert [r["reference"] for r in plain] == [int(r["reference"]) for r in lit_rows]

    lit_acc = sum(r["reward"] >= 1.0 for r in lit_rows) / n
    plain_acc = report["summary"]["accuracy"]
    assert lit_acc == pytest.approx(final.accuracy)
    same_text = sum(p["completion"] == r["completion"] for p, r in zip(plain, lit_rows, strict=True))
    same_as_start = sum(p["completion"] == r["completion"] for p, r in zip(plain, start_rows, strict=True))
    disagree = [
        (r["question"], r["verdict"], r["completion"], p["completion"])
        for p, r in zip(plain, lit_rows, strict=True)
        if p["right"] != (r["reward"] >= 1.0)
    ]
    summary = (
        f"lit_dash {lit_acc:.1%} (step 0: {first.accuracy:.1%}) vs plain vLLM {plain_acc:.1%} on {n}; "
        f"identical completions {same_text}/{n} (vs step 0's: {same_as_start}/{n}); "
        f"fit {fit_seconds:.0f} s, check {report['summary']['seconds']:.0f} s; disagreements: {disagree[:3]}"
    )
    print(summary)
    p = (lit_acc + plain_acc) / 2
    assert abs(lit_acc - plain_acc) <= max(0.08, 3 * math.sqrt(p * (1 - p) / n)), summary
    # greedy on the same weights and prompts: nearly the same text, and the exported weights are the
    # trained ones (closer to the final evaluation than to the one before training)
    assert same_text >= 0.8 * n, summary
    assert same_as_start < n, (
        f"the fit changed no completion, so nothing tells trained weights apart: {summary}"
    )
    assert same_text > same_as_start, summary
    # the two rules may only disagree where lit_dash's answer was an unevaluated expression, or where the
    # completions themselves differ
    for question, verdict, lit_text, plain_text in disagree:
        assert verdict == "unevaluated" or lit_text != plain_text, (question, verdict, lit_text)
