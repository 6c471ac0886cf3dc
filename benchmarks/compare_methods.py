"""The paper's method comparison at laptop scale: base, SFT, DASH, DASH without KL, PPO multi, PPO mini.

Every method trains the demo's model on the demo's task (configs/demo.yaml; SFT: configs/sft_demo.yaml)
for the same **sample budget**: ``--steps`` batches of ``prompts_per_rollout`` (12) problems. An RL
method samples ``group_size`` (8) completions per problem, 96 per rollout, from the policy of that
moment; SFT trains on each problem's one reference solution. PPO "multi" takes ``ppo_epochs`` (2)
optimizer steps over each rollout, PPO "mini" up to ``ppo_mini_batches`` (2) steps on slices of it, so
they take more optimizer steps than DASH for the same samples (as in the paper). Rows:

    base        the untrained model (greedy evaluation only; deterministic, so one run serves every seed)
    sft         supervised cross-entropy on the reference worked answers
    dash        DASH with the paper's KL term (kl_coef 0.04, k3)
    dash_no_kl  DASH without KL (the demo's setting)
    ppo_multi   DASH's rollouts, ppo_epochs=2 clipped passes over each (kl_coef 0.04, as in the paper)
    ppo_mini    DASH's rollouts, ppo_mini_batches=2 clipped steps on halves (kl_coef 0.04)

Each run is its own ``python -m lit_dash.cli`` process, one after another (two at once fight over the
cores). Results come from the run's own files: the evaluation JSONL under ``<log_dir>/eval/``, the
TimingProfile's ``timing.csv`` and the TensorBoard events. Outputs in ``--out``: ``results.csv`` (one row
per run), ``summary.json``, ``curves.png`` (held-out accuracy and train reward against training steps),
the runs' folders, and the table printed at the end.

Cost, measured with the defaults (the demo's 16 steps, 2 seeds, 100 problems, evaluation every 4 steps) on
2 AMD EPYC cores with native bf16 (``precision: auto`` = bf16), one run at a time: 37 minutes for the 11 runs
(a DASH run 2-2.5 minutes, PPO 3.5-4, SFT 1). A CPU without native bf16 runs fp32, several times slower.

    make compare                       # = .venv/bin/python benchmarks/compare_methods.py (37 min, see above)
    python benchmarks/compare_methods.py --steps 8 --seeds 0,1,2 --eval-problems 100 --eval-every 4 \\
        --accelerator auto --engine hf --parallel 8                 # a GPU without vLLM: ~3 min on one H200
    .venv/bin/python benchmarks/compare_methods.py --steps 2 --seeds 0 --methods base,dash_no_kl \\
        --model tiny-llama --eval-problems 8                                            # a smoke test
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import statistics
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import yaml
from cli_runs import run_logged  # benchmarks/ is the script's folder

REPO = Path(__file__).resolve().parents[1]
RL_CONFIG = REPO / "configs" / "demo.yaml"
SFT_CONFIG = REPO / "configs" / "sft_demo.yaml"
PAPER_KL = 0.04  # configs/paper: beta 0.04, k3 estimator

# method -> (base config, model overrides, optimizer steps per rollout)
METHODS: dict[str, tuple[Path, dict, int]] = {
    "base": (RL_CONFIG, {}, 0),
    "sft": (SFT_CONFIG, {}, 1),
    "dash": (RL_CONFIG, {"kl_coef": PAPER_KL, "kl_estimator": "k3"}, 1),
    "dash_no_kl": (RL_CONFIG, {"kl_coef": 0.0}, 1),
    "ppo_multi": (RL_CONFIG, {"kl_coef": PAPER_KL, "update": "multi", "ppo_epochs": 2}, 2),
    "ppo_mini": (RL_CONFIG, {"kl_coef": PAPER_KL, "update": "mini", "ppo_mini_batches": 2}, 2),
}


def run_config(method: str, seed: int, args: argparse.Namespace, root: Path) -> dict:
    """The run's full config: the demo's, with the budget, seed, model and evaluation set from the flags."""
    base_path, model_overrides, steps_per_rollout = METHODS[method]
    cfg = copy.deepcopy(yaml.safe_load(base_path.read_text()))
    cfg["seed_everything"] = seed
    trainer = cfg["trainer"]
    trainer.update(default_root_dir=str(root), enable_checkpointing=False, enable_progress_bar=False)
    model = cfg["model"]["init_args"]
    model.update(model_overrides)
    if args.model:
        model["model"] = args.model
    data = cfg["data"].get("init_args", cfg["data"])  # sft_demo.yaml names its class, demo.yaml does not
    if args.accelerator:
        trainer["accelerator"] = args.accelerator
    if args.engine:
        data["engine"] = {"kind": args.engine}
    for source in data["eval_sets"].values():
        source["num_problems"] = args.eval_problems
    if method == "base":
        trainer.update(limit_val_batches=1.0, callbacks=[])
        return cfg
    # the sample budget: exactly --steps rollouts (batches of problems), whatever the optimizer steps
    trainer.update(max_epochs=1, limit_train_batches=args.steps, max_steps=args.steps * steps_per_rollout)
    every = max(1, args.eval_every) * steps_per_rollout
    trainer["callbacks"] = [
        # no evaluation at step 0: the untrained model is the base row's (greedy, so the same numbers)
        {
            "class_path": "lit_dash.callbacks.MathEvaluation",
            "init_args": {"every_n_steps": every, "at_start": False},
        },
        {"class_path": "lit_dash.callbacks.TimingProfile"},
    ]
    return cfg


def launch(method: str, seed: int, args: argparse.Namespace) -> dict:
    """Run one method/seed in its own process and read back what it wrote."""
    root = args.out / "runs" / f"{method}_seed{seed}"
    root.mkdir(parents=True, exist_ok=True)
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump(run_config(method, seed, args, root), sort_keys=False))
    subcommand = "validate" if method == "base" else "fit"
    command = [sys.executable, "-m", "lit_dash.cli", subcommand, "--config", str(config)]
    wall = run_logged(command, root, f"compare_methods {method} seed {seed}")
    return read_run(method, seed, root, wall, args)


def _log_dir(root: Path) -> Path:
    versions = sorted((root / "lightning_logs").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    if not versions:
        raise RuntimeError(f"no lightning_logs/version_* under {root}; see {root}/output.log")
    return versions[-1]


def _eval_points(log_dir: Path, set_name: str) -> list[tuple[int, dict]]:
    """(optimizer step, summary) for every evaluation the run wrote, in step order."""
    points = []
    for path in (log_dir / "eval").glob(f"{set_name}_*_step*.jsonl"):
        records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        step = int(path.stem.rsplit("step", 1)[1])
        n = max(len(records), 1)
        points.append(
            (
                step,
                {
                    "accuracy": sum(r["reward"] >= 1.0 for r in records) / n,
                    "length": sum(r["completion_tokens"] for r in records) / n,
                    "problems": len(records),
                },
            )
        )
    return sorted(points, key=lambda p: p[0])


def _train_rewards(log_dir: Path) -> list[float]:
    """``train/reward_mean`` of every rollout, in order (one TensorBoard scalar per training step)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0})
    acc.Reload()
    if "train/reward_mean" not in acc.Tags().get("scalars", []):
        return []
    return [e.value for e in sorted(acc.Scalars("train/reward_mean"), key=lambda e: (e.wall_time, e.step))]


def read_run(method: str, seed: int, root: Path, wall: float, args: argparse.Namespace) -> dict:
    log_dir = _log_dir(root)
    set_name = args.eval_set
    points = _eval_points(log_dir, set_name)
    if not points:
        raise RuntimeError(f"{method} seed {seed}: no {set_name} evaluation under {log_dir}/eval")
    timing = (
        list(csv.DictReader((log_dir / "timing.csv").open())) if (log_dir / "timing.csv").exists() else []
    )
    # timing.csv has one row per rollout, holding the optimizer step reached after it
    rollouts_at = {0: 0} | {int(float(r["step"])): i + 1 for i, r in enumerate(timing)}
    final_step, final = points[-1]
    data = yaml.safe_load((root / "config.yaml").read_text())["data"]
    data = data.get("init_args", data)
    completions_per_rollout = data["prompts_per_rollout"] * data.get("group_size", 8)
    rl = method not in ("base", "sft")
    return {
        "method": method,
        "seed": seed,
        "accuracy": final["accuracy"],
        "mean_completion_tokens": final["length"],
        "eval_problems": final["problems"],
        "rollouts": len(timing),
        "optimizer_steps": final_step,
        "wall_s": wall,
        "train_s": sum(float(r["total"]) - float(r["evaluation"]) for r in timing),
        "kept_fraction": (
            statistics.fmean(float(r["kept_completions"]) / completions_per_rollout for r in timing)
            if rl and timing
            else None
        ),
        "curve_rollouts": [rollouts_at.get(step, None) for step, _ in points],
        "curve_accuracy": [p["accuracy"] for _, p in points],
        "train_reward": _train_rewards(log_dir) if rl else [],
        "log_dir": str(log_dir),
    }


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    if len(values) < 2:
        return f"{mean:.1%}"
    return f"{mean:.1%} ± {statistics.stdev(values):.1%} ({min(values):.0%}-{max(values):.0%})"


def summarize(rows: list[dict]) -> list[dict]:
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        runs = [r for r in rows if r["method"] == method]
        kept = [r["kept_fraction"] for r in runs if r["kept_fraction"] is not None]
        out.append(
            {
                "method": method,
                "runs": len(runs),
                "accuracy_mean": statistics.fmean(r["accuracy"] for r in runs),
                "accuracy_std": statistics.stdev([r["accuracy"] for r in runs]) if len(runs) > 1 else 0.0,
                "accuracy_cell": _spread([r["accuracy"] for r in runs]),
                "mean_completion_tokens": statistics.fmean(r["mean_completion_tokens"] for r in runs),
                "wall_min": statistics.fmean(r["wall_s"] for r in runs) / 60,
                "train_min": statistics.fmean(r["train_s"] for r in runs) / 60,
                "kept_fraction": statistics.fmean(kept) if kept else None,
            }
        )
    return out


def table(summary: list[dict], args: argparse.Namespace) -> str:
    data = yaml.safe_load(RL_CONFIG.read_text())["data"]
    lines = [
        f"held-out {args.eval_set} accuracy ({args.eval_problems} problems, greedy) after {args.steps} steps of "
        f"{data['prompts_per_rollout']} problems (RL: x {data['group_size']} sampled completions; SFT: x 1 "
        "reference solution); mean ± std over seeds (min-max)",
        "| method | runs | held-out accuracy | mean completion (tokens) | wall (min/run) | train (min/run) "
        "| kept fraction |",
        "|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        kept = f"{s['kept_fraction']:.2f}" if s["kept_fraction"] is not None else "-"
        lines.append(
            f"| {s['method']} | {s['runs']} | {s['accuracy_cell']} | {s['mean_completion_tokens']:.1f} | "
            f"{s['wall_min']:.1f} | {s['train_min']:.1f} | {kept} |"
        )
    return "\n".join(lines)


def plot(rows: list[dict], path: Path, args: argparse.Namespace) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    base = next((r for r in rows if r["method"] == "base"), None)
    start = [(0, base["accuracy"])] if base else []  # step 0 is the untrained model: the base row
    for i, method in enumerate(dict.fromkeys(r["method"] for r in rows)):
        color = f"C{i}"
        for j, r in enumerate(x for x in rows if x["method"] == method):
            label = method if j == 0 else None
            if method == "base":
                left.axhline(100 * r["accuracy"], color=color, ls="--", label=label)
                continue
            points = start + [
                (x, a) for x, a in zip(r["curve_rollouts"], r["curve_accuracy"], strict=True) if x is not None
            ]
            xs, ys = [x for x, _ in points], [100 * a for _, a in points]
            left.plot(xs, ys, "o-", color=color, alpha=0.8, label=label)
            if r["train_reward"]:
                steps = range(1, len(r["train_reward"]) + 1)
                right.plot(steps, r["train_reward"], color=color, alpha=0.8, label=label)
    left.set(
        xlabel="training step (rollouts of 12 prompts x 8 completions; SFT: batches of 12 solutions)",
        ylabel="held-out accuracy (%)",
        title=f"Held-out {args.eval_set} accuracy, greedy, {args.eval_problems} problems",
    )
    right.set(
        xlabel="training step (rollouts)",
        ylabel=f"mean train reward (fraction correct, T={args.temperature:g})",
        title="Train reward of sampled completions (RL methods)",
    )
    left.set_ylim(-2, 102)
    right.set_ylim(-0.02, 1.02)
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"lit_dash method comparison: {args.model or 'smollm2-135m-instruct'}, one line per seed")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=16, help="rollouts (batches of 12 problems) per run")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds (seed_everything)")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"subset of {','.join(METHODS)}")
    parser.add_argument("--eval-problems", type=int, default=100, help="held-out arithmetic problems")
    parser.add_argument("--eval-every", type=int, default=4, help="evaluate every this many rollouts")
    parser.add_argument("--model", default=None, help="alias, folder or hub id (default: the demo's)")
    parser.add_argument("--out", type=Path, default=REPO / "runs" / "compare_methods")
    parser.add_argument("--accelerator", default=None, help="trainer accelerator (default: the configs' cpu)")
    parser.add_argument(
        "--engine", default=None, choices=("vllm", "hf"), help="rollout engine (default: vllm)"
    )
    parser.add_argument(
        "--parallel", type=int, default=1, help="runs at once (1 on a CPU; a GPU has room for several)"
    )
    args = parser.parse_args(argv)
    args.seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown or not args.methods or not args.seeds or args.steps < 1:
        parser.error(
            f"need --steps >= 1, >= 1 seed and methods from {','.join(METHODS)} (unknown: {unknown})"
        )
    args.eval_set = "arithmetic"
    args.temperature = yaml.safe_load(RL_CONFIG.read_text())["data"]["sampling"]["temperature"]
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    rows, failures = [], []
    jobs = [(m, s) for m in args.methods for s in (args.seeds[:1] if m == "base" else args.seeds)]
    # greedy base is seed-independent: one run; several runs at once only where the machine has room
    with ThreadPoolExecutor(max(1, args.parallel)) as pool:
        futures = [(method, seed, pool.submit(launch, method, seed, args)) for method, seed in jobs]
        for method, seed, future in futures:
            try:
                rows.append(future.result())
            except RuntimeError as exc:
                failures.append(str(exc))
                print(f"[compare_methods] {exc}", flush=True)
                continue
            r = rows[-1]
            print(
                f"  {method} seed {seed}: accuracy {r['accuracy']:.1%}, {r['mean_completion_tokens']:.1f} tokens, "
                f"{r['wall_s']:.0f} s",
                flush=True,
            )
    if not rows:
        print("[compare_methods] every run failed", file=sys.stderr)
        return 1
    summary = summarize(rows)
    with (args.out / "results.csv").open("w", newline="") as f:
        keys = [k for k in rows[0] if not k.startswith("curve_") and k != "train_reward"]
        writer = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    (args.out / "summary.json").write_text(
        json.dumps({"settings": settings, "summary": summary, "runs": rows}, indent=1)
    )
    plot(rows, args.out / "curves.png", args)
    print("\n" + table(summary, args))
    print(f"\n[compare_methods] wrote {args.out}/results.csv, summary.json, curves.png")
    for failure in failures:
        print(f"[compare_methods] FAILED: {failure.splitlines()[0]}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
