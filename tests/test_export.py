"""What a user takes home, on the tiny model and real vLLM: the session's 2-step fit through the CLI
(conftest's ``tiny_cli_fit``: the ExportModel callback and a StepCheckpoint that monitors held-out
accuracy, fp32, on the session engine), then

- vLLM loads the export and gives the trained policy's greedy completions and log-probs (fp32); the
  untrained base model's differ (negative control);
- ``lit-dash export`` on the checkpoint writes the same weights; a bad dtype is refused;
- the evaluation figures reach ``trainer.callback_metrics``, so the monitored checkpoint is the best
  step's and ``ckpt_path="best"`` loads it (Lightning's test loop scores it as the fit's evaluation did);
- ``lit-dash predict`` and ``lit-dash test`` through the CLI (hf engine: no second vLLM start).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from support import MONITOR, REPO, cli_env, restore_engine_weights, sequence_logprobs

from lit_dash.callbacks import ExportModel, MathEvaluation, StepCheckpoint
from lit_dash.cli import build_cli, main
from lit_dash.data.formatting import format_prompts
from lit_dash.engines.base import SamplingConfig

# kept alive for the session: an in-process vLLM engine, once collected, tears down the parallel state
# every other engine of the process shares (the fit's engine then fails)
_ENGINES: list = []


@pytest.fixture(scope="module")
def fitted(tiny_cli_fit):
    return tiny_cli_fit.cli, tiny_cli_fit.config


def _callback(trainer, kind):
    return next(c for c in trainer.callbacks if isinstance(c, kind))


def test_vllm_serves_the_export_as_the_trained_policy(fitted):
    from transformers import AutoModelForCausalLM

    from lit_dash.engines.vllm_engine import VLLMEngine

    cli, _ = fitted
    trainer, module, dm = cli.trainer, cli.model, cli.datamodule
    export = _callback(trainer, ExportModel).path
    assert export == Path(trainer.log_dir) / "export"
    names = {p.name for p in export.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors", "tokenizer.json"} <= names
    weights = load_file(export / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}  # the training dtype (fp32 masters)
    assert json.loads((export / "config.json").read_text())["use_cache"] is True

    engine = VLLMEngine(str(export), seed=0, kv_cache_gib=0.25, max_model_len=512, dtype="float32")
    _ENGINES.append(engine)
    problems = dm.evaluators["arithmetic"].problems[:4]
    prompts = format_prompts(problems, engine.tokenizer, style=dm.prompt_style, instruction=dm.instruction)
    assert engine.tokenizer.chat_template == dm.engine.tokenizer.chat_template  # the template came along
    result = engine.generate(prompts, 1, SamplingConfig(temperature=0.0, max_new_tokens=12))
    module.policy.eval()
    base = AutoModelForCausalLM.from_pretrained(module.model_path(), dtype=torch.float32)
    gaps, base_gaps = [], []
    for prompt_ids, completion in zip(result.prompt_token_ids, result.completions, strict=True):
        # greedy: the trained policy's own argmax continuation is vLLM-from-export's
        with torch.no_grad():
            greedy = module.policy.generate(
                torch.tensor([prompt_ids]), max_new_tokens=len(completion.token_ids), do_sample=False
            )[0, len(prompt_ids) :]
        assert greedy.tolist() == completion.token_ids
        ids = prompt_ids + completion.token_ids
        served = torch.tensor(engine.sequence_logprobs([ids])[0])
        gaps.append((served - sequence_logprobs(module.policy, ids)).abs().max())
        base_gaps.append((served - sequence_logprobs(base, ids)).abs().max())
    print(f"max |vLLM(export) - policy| log-prob: {max(gaps):.2e}; vs base: {min(base_gaps):.2e}")
    assert max(gaps) < 1e-4, gaps  # fp32 on both sides
    assert min(base_gaps) > 1e-2, base_gaps  # negative control: the untrained model is told apart


def test_lit_dash_export_from_the_checkpoint_writes_the_same_weights(fitted, tmp_path, capsys):
    cli, _ = fitted
    last = Path(cli.trainer.default_root_dir) / "checkpoints" / "last.ckpt"
    main(["export", "--ckpt_path", str(last), "--out", str(tmp_path / "fp32")])
    assert str(tmp_path / "fp32") in capsys.readouterr().out
    ours = load_file(tmp_path / "fp32" / "model.safetensors")
    callbacks = load_file(_callback(cli.trainer, ExportModel).path / "model.safetensors")
    assert ours.keys() == callbacks.keys()
    assert all(torch.equal(ours[k], callbacks[k]) for k in ours)

    main(["export", "--ckpt_path", str(last), "--out", str(tmp_path / "bf16"), "--dtype", "bfloat16"])
    half = load_file(tmp_path / "bf16" / "model.safetensors")
    assert {t.dtype for t in half.values()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
    with pytest.raises(SystemExit) as exit_:
        main(["export", "--ckpt_path", str(tmp_path / "missing.ckpt"), "--out", str(tmp_path / "x")])
    assert exit_.value.code == 2 and "does not exist" in capsys.readouterr().err


def test_the_monitored_checkpoint_is_the_best_evaluated_step(fitted, tiny_engine, tiny_model_path):
    cli, _ = fitted
    trainer = cli.trainer
    assert MONITOR in trainer.callback_metrics
    history = {step: r.accuracy for step, r in _callback(trainer, MathEvaluation).history if step > 0}
    assert sorted(history) == [1, 2]
    best_step = max(history, key=lambda s: (history[s], -s))  # the first of equal scores is kept
    checkpoint = _callback(trainer, StepCheckpoint)
    assert float(checkpoint.best_model_score) == pytest.approx(history[best_step])
    best = torch.load(checkpoint.best_model_path, map_location="cpu", weights_only=False)
    assert best["global_step"] == best_step

    # the test loop, with the best weights, on the shared fit's trainer: it loads them into the fit's model,
    # pushes them into the session engine and starts callback_metrics afresh; each gets the fit's back
    # after it (the other tests of the fit read them)
    final = {k: v.clone() for k, v in cli.model.state_dict().items()}
    fit_metrics = dict(trainer.callback_metrics)
    try:
        trainer.test(cli.model, datamodule=cli.datamodule, ckpt_path="best")
        tested = float(trainer.callback_metrics["test/arithmetic/accuracy"])
    finally:
        cli.model.load_state_dict(final)
        restore_engine_weights(tiny_engine, tiny_model_path)
        trainer.callback_metrics.update(fit_metrics)  # the live dict: Lightning's loops read it
    assert tested == pytest.approx(history[best_step])
    # named by the trainer's step (the test loop does not restore the checkpoint's), so found by glob
    (test_rows,) = (Path(trainer.log_dir) / "eval").glob("arithmetic_test_step*.jsonl")
    fit_rows = Path(trainer.log_dir) / "eval" / f"arithmetic_fit_step{best_step}.jsonl"
    completions = [
        [json.loads(x)["completion"] for x in f.read_text().splitlines()] for f in (test_rows, fit_rows)
    ]
    assert completions[0] == completions[1]  # the same weights, greedy: the same completions


def _checkpoint_policy(path: str, base_path: str):
    """The policy a Lightning checkpoint holds, as a plain transformers model (fp32)."""
    from transformers import AutoModelForCausalLM

    state = torch.load(path, map_location="cpu", weights_only=False)["state_dict"]
    model = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model.load_state_dict({k.removeprefix("policy."): v for k, v in state.items() if k.startswith("policy.")})
    return model.eval()


def test_validate_test_and_predict_serve_the_checkpoints_weights(fitted, tmp_path):
    """``validate``, ``test`` and ``predict --ckpt_path`` (hf engine: no second vLLM start) generate with
    the checkpoint's weights: the engine's model scores a sequence as the checkpoint's policy does (fp32,
    1e-4), and the untrained weights, the negative control, are rejected by the same tolerance."""
    from transformers import AutoModelForCausalLM

    cli, config = fitted
    last = str(Path(cli.trainer.default_root_dir) / "checkpoints" / "last.ckpt")
    base_path = cli.model.model_path()
    trained = _checkpoint_policy(last, base_path)
    untrained = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).eval()
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"question": "What is 2 + 3?", "answer": "5"}\n{"question": "What is 1 + 1?"}\n')
    hf = ["--data.engine.kind", "hf", "--data.engine.dtype", "float32"]

    def run(subcommand: str, *extra: str):
        root = ["--trainer.default_root_dir", str(tmp_path / subcommand)]
        done = build_cli([subcommand, "--config", str(config), "--ckpt_path", last, *hf, *root, *extra])
        engine = done.datamodule.engine
        ids = engine.tokenizer("What is 3 + 4? The answer is 7.")["input_ids"]
        served = sequence_logprobs(engine.model, ids)
        torch.testing.assert_close(served, sequence_logprobs(trained, ids), atol=1e-4, rtol=0)
        # two steps at lr 1e-4 move these log-probs by ~0.013: 10x the tolerance is a clear rejection
        gap = float((served - sequence_logprobs(untrained, ids)).abs().max())
        assert gap > 1e-3, f"{subcommand}: the untrained weights would pass too (gap {gap:.1e})"
        return done

    predicted = run("predict", "--data.predict_file", str(prompts))
    rows = [
        json.loads(x)
        for x in (Path(predicted.trainer.log_dir) / "predictions.jsonl").read_text().splitlines()
    ]
    assert [r["question"] for r in rows] == ["What is 2 + 3?", "What is 1 + 1?"]
    assert rows[0]["reward"] == float(len(rows[0]["completion"]) % 2 == 0)  # the module's (parity) reward
    assert "reward" not in rows[1] and rows[1]["completion_tokens"] > 0

    # tiny.yaml's limit_val_batches: 0 keeps validation out of the fit; validate gets the whole set back
    for subcommand, extra in (("test", ()), ("validate", ("--trainer.limit_val_batches", "1.0"))):
        scored_run = run(subcommand, *extra)
        (scored,) = (Path(scored_run.trainer.log_dir) / "eval").glob(f"arithmetic_{subcommand}_step*.jsonl")
        rewards = [json.loads(x)["reward"] for x in scored.read_text().splitlines()]
        assert len(rewards) == len(cli.datamodule.evaluators["arithmetic"].problems)
        metric = "test/arithmetic/accuracy" if subcommand == "test" else "eval/arithmetic/accuracy"
        accuracy = float(scored_run.trainer.callback_metrics[metric])
        assert accuracy == pytest.approx(sum(rewards) / len(rewards))  # the logged figure is the rows' mean


def test_independent_check_scores_the_export(fitted, tmp_path):
    """The demo's closing command: plain vLLM on the export reproduces the fit's final greedy evaluation."""
    import subprocess
    import sys

    cli, _ = fitted
    log_dir = Path(cli.trainer.log_dir)
    final = log_dir / "eval" / "arithmetic_fit_step2.jsonl"
    out = tmp_path / "check.json"
    script = REPO / "scripts" / "independent_check.py"
    args = ["--model", str(log_dir / "export"), "--questions-from", str(final), "--json-out", str(out)]
    proc = subprocess.run(
        [sys.executable, str(script), *args, "--kv-cache-gib", "0.25"],
        capture_output=True,
        text=True,
        timeout=300,
        env=cli_env(),
    )
    assert out.is_file(), f"{proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    report = json.loads(out.read_text())
    plain, summary = report["records"], report["summary"]
    lit = [json.loads(line) for line in final.read_text().splitlines()]
    assert [r["prompt"] for r in plain] == [r["prompt"] for r in lit]  # instruction read from hparams.yaml
    assert [r["completion"] for r in plain] == [r["completion"] for r in lit]
    assert [str(r["reference"]) for r in plain] == [r["reference"] for r in lit]
    # the summary is its records' and the fit's: n, its accuracy, lit_dash's figure and the difference
    assert summary["n"] == len(lit) and summary["checkpoint"] == str(log_dir / "export")
    assert summary["accuracy"] == pytest.approx(sum(r["right"] for r in plain) / len(plain))
    assert summary["lit_dash"]["step"] == 2 and summary["lit_dash"]["n"] == len(lit)
    assert summary["lit_dash"]["accuracy"] == pytest.approx(sum(r["reward"] >= 1.0 for r in lit) / len(lit))
    assert summary["difference"] == pytest.approx(summary["accuracy"] - summary["lit_dash"]["accuracy"])
    # the tiny run's reward is the parity of the text, the check's is the answer: they may disagree, and
    # the script exits 1 exactly when they differ by more than its 0.08 default tolerance
    assert proc.returncode == int(abs(summary["difference"]) > 0.08), proc.stdout
    assert "lit_dash's evaluation at step 2" in proc.stdout


def test_an_fsdp_sharded_checkpoint_folder_is_consolidated(tiny_model_path, tmp_path):
    """The layout Lightning's FSDPStrategy writes with state_dict_type "sharded": a torch.distributed
    checkpoint of {"model": state_dict} plus meta.pt with the rest (written here in one process)."""
    import torch.distributed.checkpoint as dcp
    from transformers import AutoModelForCausalLM

    from lit_dash.export import export_checkpoint

    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    state = {f"policy.{k}": v + 1.0 for k, v in base.state_dict().items()}  # weights the base lacks
    folder = tmp_path / "sharded.ckpt"
    dcp.save({"model": state}, checkpoint_id=str(folder))
    torch.save({"global_step": 3, "hyper_parameters": {"model": "tiny-llama"}}, folder / "meta.pt")
    weights = load_file(export_checkpoint(folder, tmp_path / "out") / "model.safetensors")
    assert all(torch.equal(weights[k], state[f"policy.{k}"]) for k in weights)
    assert not torch.equal(weights["model.norm.weight"], base.state_dict()["model.norm.weight"])
    (tmp_path / "neither").mkdir()
    with pytest.raises(ValueError, match="neither a sharded"):
        export_checkpoint(tmp_path / "neither", tmp_path / "x")
