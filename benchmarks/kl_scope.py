"""Which completions the KL term covers, on the demo: ``model.kl_over`` kept against sampled.

With ``kl_over: kept`` (the paper's DASH) the KL is computed on the completions filtering kept and divided
by the sampled denominators, so its weight is ``kl_coef x kept / sampled`` and a uniform group gets none;
``sampled`` (TRL, verl) runs the dropped completions forward and backward too, at advantage 0, for their
KL alone. For each seed, the two runs one after the other, each its own process:

    lit-dash fit --config configs/demo.yaml --trainer.max_steps 12 --seed_everything S \\
        --model.init_args.kl_coef 0.04 --model.init_args.kl_over {kept,sampled}

The table: held-out accuracy at each evaluation (MathEvaluation, every 4 steps in the demo), the train wall
time up to it (timing.csv: each step's ``total`` less its ``evaluation``), the mean seconds of a training
step and of its forward+backward, completions micro-batches per step (of the kept completions, or of all sampled), the
effective KL coefficient (train/kl_effective_coef, mean over steps) and the last step's KL.
``--out`` gets ``kl_scope.json`` and the runs' folders (checkpoints and exports deleted after reading).
Arguments after ``--`` go to every ``lit-dash fit``.

    python benchmarks/kl_scope.py                                   # 4 demo runs (135M), one after another
    python benchmarks/kl_scope.py --steps 2 --seeds 0 --model tiny-llama --out /tmp/kl_smoke \\
        -- --data.eval_sets.arithmetic.num_problems 8 --data.sampling.max_new_tokens 8    # a smoke run
"""

from __future__ import annotations

import argparse
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
SETTINGS = ("kept", "sampled")


def fit_command(args: argparse.Namespace, setting: str, seed: int, root: Path) -> list[str]:
    cmd = fit_base_command(args.config, args.steps, seed, root)
    cmd += ["--model.init_args.kl_coef", str(args.kl_coef), "--model.init_args.kl_over", setting]
    if args.model:
        cmd += ["--model.init_args.model", args.model]
    return cmd + list(args.fit_args)


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def summarize_run(
    scalars: dict[str, list[tuple[int, float]]], timing: list[dict[str, float]], eval_tag: str
) -> dict:
    """One run's figures from its TensorBoard scalars (tag -> (step, value)) and timing.csv rows."""
    accuracy = {int(step): float(v) for step, v in scalars.get(eval_tag, [])}
    train_s, seconds, step_s, fwd_bwd_s = {0: 0.0}, 0.0, [], []
    for row in sorted(timing, key=lambda r: r["step"]):
        step = row["total"] - row.get("evaluation", 0.0)
        seconds += step
        train_s[int(row["step"])] = seconds
        step_s.append(step)
        fwd_bwd_s.append(row.get("forward_backward", 0.0) + row.get("ref_old_logprobs", 0.0))

    def values(tag: str) -> list[float]:
        return [v for _, v in scalars.get(tag, [])]

    kl = values("train/kl")
    return {
        "accuracy": accuracy,
        "train_seconds": {step: train_s[step] for step in accuracy if step in train_s},
        "step_s_mean": _mean(step_s),
        "forward_backward_s_mean": _mean(fwd_bwd_s),  # the policy's and the reference's passes
        "micro_batches_mean": _mean(values("train/micro_batches")),  # kept, or every sampled completion
        "kept_completions_mean": _mean(values("train/kept_completions")),
        "sampled_completions_mean": _mean(values("train/sampled_completions")),
        "kl_effective_coef_mean": _mean(values("train/kl_effective_coef")),
        "kl_last": kl[-1] if kl else float("nan"),
        "completion_tokens_mean": _mean(values("train/completion_tokens_mean")),
    }


def table(rows: list[dict]) -> str:
    steps = sorted({s for r in rows for s in r["accuracy"]})
    head = ["kl_over", "seed", *[f"acc@{s}" for s in steps], *[f"train s@{s}" for s in steps if s]]
    head += ["s/step", "fwd+bwd s/step", "micro-batches", "kept / sampled", "kl_effective_coef"]
    head += ["KL (last)", "tokens"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["setting"], str(r["seed"])]
        cells += [f"{r['accuracy'][s]:.2f}" if s in r["accuracy"] else "-" for s in steps]
        cells += [f"{r['train_seconds'][s]:.0f}" if s in r["train_seconds"] else "-" for s in steps if s]
        cells += [f"{r['step_s_mean']:.1f}", f"{r['forward_backward_s_mean']:.1f}"]
        cells += [f"{r['micro_batches_mean']:.1f}"]
        cells += [f"{r['kept_completions_mean']:.0f} / {r['sampled_completions_mean']:.0f}"]
        cells += [
            f"{r['kl_effective_coef_mean']:.4f}",
            f"{r['kl_last']:.4f}",
            f"{r['completion_tokens_mean']:.1f}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_one(args: argparse.Namespace, setting: str, seed: int) -> dict:
    from lit_dash.logs import find_log_dir, read_scalars, read_timing

    root = args.out / "runs" / f"{setting}_seed{seed}"
    fresh_root(root)
    cmd = fit_command(args, setting, seed, root)
    wall = run_logged(cmd, root, f"kl_scope {setting} seed {seed}")
    log_dir = find_log_dir(root)
    run = summarize_run(read_scalars(log_dir), read_timing(log_dir), args.eval_tag)
    run.update(setting=setting, seed=seed, process_wall_s=wall, log_dir=str(log_dir), command=cmd[1:])
    drop_heavy(root)
    return run


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv, fit_args = split_fit_args(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    p.add_argument("--steps", type=int, default=12, help="trainer.max_steps (rollouts, update: dash)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seed_everything values")
    p.add_argument("--kl-coef", type=float, default=0.04, help="model.kl_coef (the paper's 0.04)")
    p.add_argument("--model", default=None, help="model.init_args.model (default: the config's)")
    p.add_argument("--eval-tag", default="eval/arithmetic/accuracy")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "kl_scope")
    args = p.parse_args(argv)
    args.fit_args = fit_args
    args.seeds = [int(s) for s in args.seeds.split(",")]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run_one(args, setting, seed) for seed in args.seeds for setting in SETTINGS]
    out = write_report(args, "kl_scope", rows)
    print(table(rows))
    print(f"[kl_scope] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
