"""Prompt skipping on the demo: held-out accuracy and train time with and without ``data.prompt_skipping``.

For each seed, two runs one after the other (two at once fight over the cores), each its own process:

    lit-dash fit --config configs/demo.yaml --trainer.max_steps 12 --seed_everything S \\
        --data.train.num_problems 36 [--data.prompt_skipping '{"history": 2, "explore": 0.2}']

Skipping acts only on a prompt seen before: the demo's 2000 training problems, 12 per rollout, never
repeat within 12 rollouts, so nothing would be skipped. ``--train-problems`` (default 36: 3 batches an
epoch, each prompt sampled 4 times in 12 rollouts) shrinks the training set of BOTH runs alike; 0 keeps
the config's. Held-out evaluation (MathEvaluation, eval/arithmetic/accuracy) is the same set either way.

The table: accuracy at each evaluation step, cumulative train wall time at it (timing.csv: every step's
``total`` minus its ``evaluation``, summed up to that step), completions generated (train/
sampled_completions summed), samples saved (train/skipped_completions summed) and the train time the run
took to reach the no-skip run's final accuracy (same seed; ``-`` if it never did). ``--out`` gets
``prompt_skipping.json`` and the runs' folders (their checkpoints and exports are deleted after reading,
unless ``--keep-checkpoints``). Arguments after ``--`` go to every ``lit-dash fit``.

    python benchmarks/prompt_skipping.py                              # 4 demo runs (135M), one after another
    python benchmarks/prompt_skipping.py --steps 2 --seeds 0 --model tiny-llama --out /tmp/skip_smoke \\
        -- --data.eval_sets.arithmetic.num_problems 8 --data.sampling.max_new_tokens 8    # a smoke run
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from cli_runs import (  # benchmarks/ is the script's folder
    drop_heavy,
    fit_base_command,
    fresh_root,
    run_logged,
    split_fit_args,
    write_report,
)

REPO = Path(__file__).resolve().parents[1]
SETTINGS = ("no_skip", "skip")


def fit_command(args: argparse.Namespace, setting: str, seed: int, root: Path) -> list[str]:
    cmd = fit_base_command(args.config, args.steps, seed, root)
    if args.train_problems:
        cmd += ["--data.train.num_problems", str(args.train_problems)]
    if args.model:
        cmd += ["--model.init_args.model", args.model]
    if setting == "skip":
        knob = {"history": args.history, "explore": args.explore}
        cmd += ["--data.prompt_skipping", json.dumps(knob)]
    return cmd + list(args.fit_args)


def summarize_run(
    scalars: dict[str, list[tuple[int, float]]], timing: list[dict[str, float]], eval_tag: str
) -> dict:
    """One run's figures from its TensorBoard scalars (tag -> (step, value)) and timing.csv rows."""
    accuracy = {int(step): float(v) for step, v in scalars.get(eval_tag, [])}
    train_s, seconds = {0: 0.0}, 0.0
    for row in sorted(timing, key=lambda r: r["step"]):
        seconds += row["total"] - row.get("evaluation", 0.0)
        train_s[int(row["step"])] = seconds
    return {
        "accuracy": accuracy,
        "train_seconds": {step: train_s[step] for step in accuracy if step in train_s},
        "total_train_seconds": seconds,
        "completions_generated": sum(v for _, v in scalars.get("train/sampled_completions", [])),
        "samples_saved": sum(v for _, v in scalars.get("train/skipped_completions", [])),
        "skipped_prompts": sum(v for _, v in scalars.get("train/skipped_prompts", [])),
    }


def time_to_reach(run: dict, target: float) -> tuple[int, float] | None:
    """(step, train seconds) of the run's first evaluation at or above ``target`` accuracy; None if none."""
    for step in sorted(run["accuracy"]):
        if run["accuracy"][step] >= target and step in run["train_seconds"]:
            return step, run["train_seconds"][step]
    return None


def compare(runs: dict[tuple[str, int], dict]) -> list[dict]:
    """Table rows, each run beside its seed's no-skip run (the target: that run's final accuracy)."""
    rows = []
    for (setting, seed), run in sorted(runs.items(), key=lambda kv: (kv[0][1], SETTINGS.index(kv[0][0]))):
        base = runs.get(("no_skip", seed))
        target = base["accuracy"][max(base["accuracy"])] if base and base["accuracy"] else None
        reached = time_to_reach(run, target) if target is not None else None
        rows.append(
            {
                "setting": setting,
                "seed": seed,
                **run,
                "target_accuracy": target,
                "reached_target_at": None if reached is None else {"step": reached[0], "train_s": reached[1]},
            }
        )
    return rows


def table(rows: list[dict]) -> str:
    steps = sorted({s for r in rows for s in r["accuracy"]})
    head = ["setting", "seed", *[f"acc@{s}" for s in steps], *[f"train s@{s}" for s in steps if s]]
    head += ["completions generated", "samples saved", "train s to no-skip final acc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["setting"], str(r["seed"])]
        cells += [f"{r['accuracy'][s]:.3f}" if s in r["accuracy"] else "-" for s in steps]
        cells += [f"{r['train_seconds'][s]:.0f}" if s in r["train_seconds"] else "-" for s in steps if s]
        cells += [f"{r['completions_generated']:.0f}", f"{r['samples_saved']:.0f}"]
        reached = r["reached_target_at"]
        cells.append("-" if reached is None else f"{reached['train_s']:.0f} (step {reached['step']})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_one(args: argparse.Namespace, setting: str, seed: int) -> dict:
    from lit_dash.logs import find_log_dir, read_scalars, read_timing

    root = args.out / "runs" / f"{setting}_seed{seed}"
    fresh_root(root)
    cmd = fit_command(args, setting, seed, root)
    wall = run_logged(cmd, root, f"prompt_skipping {setting} seed {seed}")
    log_dir = find_log_dir(root)
    run = summarize_run(read_scalars(log_dir), read_timing(log_dir), args.eval_tag)
    run.update(process_wall_s=wall, log_dir=str(log_dir), command=cmd[1:])
    if not args.keep_checkpoints:
        drop_heavy(root)
    return run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv, fit_args = split_fit_args(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    p.add_argument("--steps", type=int, default=12, help="trainer.max_steps (rollouts, update: dash)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seed_everything values")
    p.add_argument("--history", type=int, default=2, help="prompt_skipping.history (groups)")
    p.add_argument("--explore", type=float, default=0.2, help="prompt_skipping.explore (probability)")
    p.add_argument(
        "--train-problems",
        type=int,
        default=36,
        help="data.train.num_problems of both runs (0: the config's)",
    )
    p.add_argument("--model", default=None, help="model.init_args.model (default: the config's)")
    p.add_argument("--eval-tag", default="eval/arithmetic/accuracy")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "prompt_skipping")
    p.add_argument("--keep-checkpoints", action="store_true")
    args = p.parse_args(argv)
    args.fit_args = fit_args
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    runs = {(s, seed): run_one(args, s, seed) for seed in args.seeds for s in SETTINGS}
    rows = compare(runs)
    out = write_report(args, "prompt_skipping", rows)
    print(table(rows))
    print(f"[prompt_skipping] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
