"""The demo in full bf16 against fp32 on one machine: held-out accuracy, the engine gap per step, speed.

Three settings, for each seed one after another, each its own process:

    fp32        --model.init_args.precision float32 --data.engine.dtype float32
    bf16        --model.init_args.precision bfloat16 --data.engine.dtype bfloat16   (bf16_dither: auto, on)
    bf16_grid   the same with --model.init_args.bf16_dither false: weights left on the bf16 grid

The demo's SmolLM2-135M is stored in bf16, so every weight starts on the bf16 grid, where a bf16 copy does
not follow updates smaller than half a bf16 step (lit_dash/training/bf16_cells.py). The table: held-out
accuracy at each evaluation, train/engine_logprob_gap at each step, mean seconds per training step.
On a CPU without native bf16 the bf16 runs are emulated and far slower. Arguments after ``--`` go to every
``lit-dash fit``.

    python benchmarks/precision_ab.py                        # 6 runs of the 4-step demo
    python benchmarks/precision_ab.py --steps 2 --seeds 0 --model tiny-llama --out /tmp/prec_smoke \\
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
SETTINGS = {
    "fp32": ["--model.init_args.precision", "float32", "--data.engine.dtype", "float32"],
    "bf16": ["--model.init_args.precision", "bfloat16", "--data.engine.dtype", "bfloat16"],
    "bf16_grid": [
        "--model.init_args.precision", "bfloat16", "--data.engine.dtype", "bfloat16",
        "--model.init_args.bf16_dither", "false",
    ],
}  # fmt: skip


def run_one(args: argparse.Namespace, setting: str, seed: int) -> dict:
    from lit_dash.hardware import cpu_has_native_bf16
    from lit_dash.logs import find_log_dir, read_scalars, read_timing

    root = args.out / "runs" / f"{setting}_seed{seed}"
    fresh_root(root)
    cmd = fit_base_command(args.config, args.steps, seed, root)
    if args.model:
        cmd += ["--model.init_args.model", args.model]
    cmd += SETTINGS[setting] + list(args.fit_args)
    wall = run_logged(cmd, root, f"precision_ab {setting} seed {seed}")
    log_dir = find_log_dir(root)
    scalars = read_scalars(log_dir)
    steps = [row["total"] - row.get("evaluation", 0.0) for row in read_timing(log_dir)]
    drop_heavy(root)
    return {
        "setting": setting,
        "seed": seed,
        "accuracy": {int(s): float(v) for s, v in scalars.get(args.eval_tag, [])},
        "engine_gap": [round(float(v), 4) for _, v in scalars.get("train/engine_logprob_gap", [])],
        "step_s_mean": sum(steps) / len(steps) if steps else float("nan"),
        "process_wall_s": wall,
        "native_bf16": cpu_has_native_bf16(),
        "log_dir": str(log_dir),
        "command": cmd[1:],
    }


def table(rows: list[dict]) -> str:
    steps = sorted({s for r in rows for s in r["accuracy"]})
    head = ["setting", "seed", *[f"acc@{s}" for s in steps], "engine gap per step", "s/step"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        cells = [r["setting"], str(r["seed"])]
        cells += [f"{r['accuracy'][s]:.2f}" if s in r["accuracy"] else "-" for s in steps]
        cells += [", ".join(f"{g:.3f}" for g in r["engine_gap"]), f"{r['step_s_mean']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    argv, fit_args = split_fit_args(argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, default=REPO / "configs" / "demo.yaml")
    p.add_argument("--steps", type=int, default=4, help="trainer.max_steps (the demo evaluates every 4)")
    p.add_argument("--seeds", default="0,1", help="comma-separated seed_everything values")
    p.add_argument("--settings", default=",".join(SETTINGS), help=f"a subset of {','.join(SETTINGS)}")
    p.add_argument("--model", default=None, help="model.init_args.model (default: the config's)")
    p.add_argument("--eval-tag", default="eval/arithmetic/accuracy")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "precision_ab")
    args = p.parse_args(argv)
    args.fit_args = fit_args
    args.seeds = [int(s) for s in args.seeds.split(",")]
    args.settings = args.settings.split(",")
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        p.error(f"unknown settings {unknown}; choose from {list(SETTINGS)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows = [run_one(args, setting, seed) for seed in args.seeds for setting in args.settings]
    out = write_report(args, "precision_ab", rows)
    print(table(rows))
    print(f"[precision_ab] wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
