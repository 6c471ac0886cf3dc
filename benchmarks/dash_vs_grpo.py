"""DASH against standard GRPO: the same work under four settings, in one run, on one machine.

Settings (everything else equal: model, data, seed, prompts_per_rollout x group_size, optimizer steps):

    grpo        per-micro-batch sampling (one engine call per micro-batch), no filtering
    preemptive  one engine call per step (preemptive sampling), no filtering
    filtering   per-micro-batch sampling, gradient filtering (|advantage| <= threshold dropped)
    dash        preemptive sampling + gradient filtering

All four share one in-process vLLM engine (it receives each setting's initial weights at train start, so
every setting starts from the same policy) and draw the same prompts in the same order. Each setting's
run directory holds the TimingProfile's ``timing.csv`` and TensorBoard events (``<out>/<setting>/``).

Prints a table (per-phase seconds per optimizer step, total, ratio to GRPO, mean reward, kept fraction),
saves a stacked-bar PNG of the phase breakdown, and ends with ``DASH/GRPO time ratio: X.XX``.

    .venv/bin/python benchmarks/dash_vs_grpo.py                       # CPU defaults, ~15 min on 2 cores
    .venv/bin/python benchmarks/dash_vs_grpo.py --steps 8 --prompts 64 --group-size 4 \\
        --micro-batch 8 --max-new-tokens 512 --kv-cache-gib 8          # GPU scale
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from lit_dash.callbacks import TimingProfile  # noqa: E402
from lit_dash.callbacks.timing import PHASES  # noqa: E402
from lit_dash.data.datamodule import EngineConfig, ProblemSource, RolloutDataModule  # noqa: E402
from lit_dash.data.formatting import format_prompts  # noqa: E402
from lit_dash.engines import SamplingConfig, build_engine  # noqa: E402
from lit_dash.hardware import resolve_dtype  # noqa: E402
from lit_dash.module import DashModule  # noqa: E402
from lit_dash.rewards import math_rewards  # noqa: E402

SETTINGS = {  # name: (rollout_mode, filtering on)
    "grpo": ("per_micro_batch", False),
    "preemptive": ("preemptive", False),
    "filtering": ("per_micro_batch", True),
    "dash": ("preemptive", True),
}
INSTRUCTION = "Put your final answer within \\boxed{}."


class StepStats(L.Callback):
    """Per-step rollout statistics (reward, kept fraction, engine calls, padding), read off the module."""

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self.rewards: list[float] = []  # every completion's reward, for the reward's confidence interval

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        rollout = pl_module.last_rollout
        stats = rollout.stats()
        self.rows.append(
            {
                "reward_mean": stats["reward_mean"],
                "kept_fraction": stats["kept_fraction"],
                "engine_calls": stats["engine_calls"],
                "padding_fraction": stats["padding_fraction"],
                "completion_tokens_mean": stats["completion_tokens_mean"],
                "completions": float(len(rollout.completions)),
            }
        )
        self.rewards += rollout.rewards.tolist()


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def _stderr(values: list[float]) -> float:
    """Standard error of the mean (completions are treated as independent, which groups are not quite)."""
    n = len(values)
    if n < 2:
        return float("nan")
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)


def run_setting(name: str, args, engine) -> dict:
    rollout_mode, filtering = SETTINGS[name]
    L.seed_everything(args.seed, verbose=False)
    module = DashModule(
        model=args.model,
        lr=args.lr,
        kl_coef=0.0,
        loss_agg="constant",
        answer_fallback=True,
        seed=args.seed,
    )
    data = RolloutDataModule(
        train=ProblemSource(source="arithmetic", difficulty=args.task, split="train", num_problems=2000),
        prompt_style="chat",
        instruction=INSTRUCTION,
        prompts_per_rollout=args.prompts,
        group_size=args.group_size,
        micro_batch_size=args.micro_batch,
        filter_threshold=args.threshold if filtering else None,
        rollout_mode=rollout_mode,
        sampling=SamplingConfig(
            temperature=args.temperature, top_k=args.top_k, max_new_tokens=args.max_new_tokens
        ),
        max_prompt_tokens=128,
        engine=EngineConfig(kind=args.engine),
    )
    data.engine = engine  # one engine for all settings; WeightSync resets it to the initial weights
    timing, stats = TimingProfile(), StepStats()
    trainer = L.Trainer(
        accelerator="auto",
        devices=1,
        max_steps=args.steps,
        logger=TensorBoardLogger(str(args.out), name=name, version=""),
        callbacks=[timing, stats],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=1,
    )
    start = time.perf_counter()
    trainer.fit(module, datamodule=data)
    wall = time.perf_counter() - start
    rows = timing.rows
    result = {
        "setting": name,
        "rollout_mode": rollout_mode,
        "filter_threshold": args.threshold if filtering else None,
        "steps": len(rows),
        "wall_s": wall,
        "phases": {p: _mean([r[p] for r in rows]) for p in (*PHASES, "other")},
        "total_s_per_step": _mean([r["total"] for r in rows]),
        "generation_tokens_per_s": _mean([r.get("generation_tokens_per_s", 0.0) for r in rows]),
        "train_tokens_per_s": _mean([r.get("train_tokens_per_s", 0.0) for r in rows]),
        "timing_csv": str(timing.path),
        **{k: _mean([r[k] for r in stats.rows]) for k in stats.rows[0]},
        "reward_per_step": [r["reward_mean"] for r in stats.rows],
        "reward_ci95": 1.96 * _stderr(stats.rewards),
    }
    del trainer, module, data
    gc.collect()
    return result


def engine_alone(engine, args) -> dict:
    """The engine's own throughput on one preemptive-size call (same prompts and sampling as a rollout)."""
    from lit_dash.data.sources import load_problems

    problems = load_problems("arithmetic", difficulty=args.task, split="train", num_problems=2000)
    prompts = format_prompts(problems[: args.prompts], engine.tokenizer, "chat", INSTRUCTION)
    sampling = SamplingConfig(
        temperature=args.temperature, top_k=args.top_k, max_new_tokens=args.max_new_tokens
    )
    best = 0.0
    for _ in range(2):
        start = time.perf_counter()
        result = engine.generate(prompts, args.group_size, sampling)
        best = max(best, result.completion_tokens / (time.perf_counter() - start))
    return {"completions_per_call": args.prompts * args.group_size, "tokens_per_s": best}


def print_table(results: list[dict]) -> None:
    grpo_total = next((r["total_s_per_step"] for r in results if r["setting"] == "grpo"), None)
    cols = [*PHASES, "other"]
    short = {"ref_old_logprobs": "ref/old", "forward_backward": "fwd+bwd", "weight_sync": "sync"}
    head = ["setting", "engine calls/step", *[short.get(c, c) for c in cols], "total s/step"]
    head += ["ratio to GRPO", "mean reward (95% CI)", "kept fraction", "padding", "gen tok/s", "train tok/s"]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for r in results:
        ratio = r["total_s_per_step"] / grpo_total if grpo_total else float("nan")
        cells = [r["setting"], f"{r['engine_calls']:.0f}"]
        cells += [f"{r['phases'][c]:.2f}" for c in cols]
        cells += [
            f"{r['total_s_per_step']:.1f}",
            f"{ratio:.2f}",
            f"{r['reward_mean']:.3f} ± {r['reward_ci95']:.3f}",
        ]
        cells += [f"{r['kept_fraction']:.2f}", f"{r['padding_fraction']:.2f}"]
        cells += [f"{r['generation_tokens_per_s']:.0f}", f"{r['train_tokens_per_s']:.0f}"]
        print("| " + " | ".join(cells) + " |")


def save_plot(results: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [*PHASES, "other"]
    fig, ax = plt.subplots(figsize=(9, 5))
    names = [r["setting"] for r in results]
    bottom = [0.0] * len(results)
    colors = plt.get_cmap("tab10").colors
    for i, phase in enumerate(cols):
        heights = [r["phases"][phase] for r in results]
        if not any(h > 0.005 for h in heights):
            continue
        ax.bar(names, heights, bottom=bottom, label=phase, color=colors[i % len(colors)])
        bottom = [b + h for b, h in zip(bottom, heights, strict=True)]
    grpo = results[0]["total_s_per_step"] if results[0]["setting"] == "grpo" else None
    for x, r in enumerate(results):
        label = f"{r['total_s_per_step']:.1f} s"
        if grpo:
            label += f"\n({r['total_s_per_step'] / grpo:.2f}x)"
        ax.text(x, bottom[x], label, ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("wall time per optimizer step (s)")
    ax.set_xlabel("setting")
    ax.set_title(title, fontsize=10)
    ax.set_ylim(0, max(bottom) * 1.25)
    ax.legend(title="phase", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, local folder or hub id")
    parser.add_argument(
        "--task", default="add2", help="arithmetic difficulty (add1, add2, add3, mul1x2, mix2)"
    )
    parser.add_argument("--settings", default=",".join(SETTINGS), help="comma-separated subset of settings")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps per setting")
    parser.add_argument("--prompts", type=int, default=16, help="prompts per rollout (P)")
    parser.add_argument("--group-size", type=int, default=4, help="completions per prompt (G; the paper: 4)")
    parser.add_argument(
        "--micro-batch",
        type=int,
        default=8,
        help="completions per backward pass, and per engine call in per-micro-batch sampling (the paper: 8)",
    )
    parser.add_argument("--max-new-tokens", type=int, default=64, help="tokens per completion")
    parser.add_argument(
        "--temperature", type=float, default=0.9, help="sampling temperature (the paper: 0.9)"
    )
    parser.add_argument("--top-k", type=int, default=50, help="sampling top-k (the paper: 50)")
    parser.add_argument("--threshold", type=float, default=0.1, help="filter |advantage| <= this")
    parser.add_argument("--lr", type=float, default=3e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--engine", default="vllm", choices=("vllm", "hf"))
    parser.add_argument("--kv-cache-gib", type=float, default=2.0, help="vLLM on CPU: KV cache (GiB)")
    parser.add_argument("--out", type=Path, default=Path("runs/dash_vs_grpo"))
    args = parser.parse_args()
    names = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in names if s not in SETTINGS]
    if unknown:
        parser.error(f"unknown setting(s) {unknown}; choose from {list(SETTINGS)}")
    if args.micro_batch % args.group_size and args.micro_batch > args.group_size:
        parser.error("--micro-batch must be a multiple of --group-size (whole groups per engine call)")

    from lit_dash.models import resolve_model

    path = resolve_model(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    kwargs = {"dtype": "auto"}
    if args.engine == "vllm":
        kwargs.update(kv_cache_gib=args.kv_cache_gib, max_model_len=128 + args.max_new_tokens)
    started = time.perf_counter()
    engine = build_engine(args.engine, path, seed=args.seed, **kwargs)
    if args.engine == "hf":
        engine.batch_size = args.prompts * args.group_size  # a preemptive rollout is one generate call
    engine.generate(["Warm-up: 1 + 1 ="], 2, SamplingConfig(max_new_tokens=8))
    math_rewards(["\\boxed{2}"], ["2"])  # start the reward's worker pool outside every setting's timing
    print(f"engine started and warmed up in {time.perf_counter() - started:.0f} s", flush=True)

    alone = engine_alone(engine, args)  # before any training: the same weights DASH's first rollout uses
    results = []
    for name in names:
        print(f"--- {name} ---", flush=True)
        results.append(run_setting(name, args, engine))
        r = results[-1]
        print(
            f"{name}: {r['total_s_per_step']:.1f} s/step, reward {r['reward_mean']:.3f}, "
            f"kept {r['kept_fraction']:.2f}",
            flush=True,
        )

    dtype = str(resolve_dtype("auto", device)).removeprefix("torch.")
    title = (
        f"DASH vs GRPO: {args.model}, arithmetic {args.task}, {device} {dtype}\n{args.prompts} prompts x "
        f"{args.group_size} completions per step, micro-batch {args.micro_batch}, {args.steps} steps per setting"
    )
    one_line = title.replace("\n", "; ")
    print(f"\nmachine: {os.cpu_count()} CPUs, {device}, {dtype}; {one_line}\n")
    print_table(results)
    by = {r["setting"]: r for r in results}
    if "dash" in by:
        dash_gen = by["dash"]["generation_tokens_per_s"]
        print(
            f"\nengine alone, one call of {alone['completions_per_call']} completions: "
            f"{alone['tokens_per_s']:.0f} tok/s; inside DASH rollouts: {dash_gen:.0f} tok/s "
            f"({dash_gen / alone['tokens_per_s']:.0%})"
        )
        sync_share = by["dash"]["phases"]["weight_sync"] / by["dash"]["total_s_per_step"]
        print(f"weight sync share of a DASH step: {sync_share:.1%}")
    png = args.out / "dash_vs_grpo.png"
    save_plot(results, png, title)
    (args.out / "results.json").write_text(
        json.dumps(
            {"args": vars(args) | {"out": str(args.out)}, "results": results, "engine_alone": alone}, indent=2
        )
    )
    print(f"plot: {png}\nresults: {args.out / 'results.json'}")
    if "dash" in by and "grpo" in by:
        ratio = by["dash"]["total_s_per_step"] / by["grpo"]["total_s_per_step"]
        if math.isfinite(ratio):
            print(f"DASH/GRPO time ratio: {ratio:.2f}")


if __name__ == "__main__":
    main()
