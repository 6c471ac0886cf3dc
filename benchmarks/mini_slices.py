"""What ``update: mini`` trains in each optimizer step: the slices of one demo rollout, cut in rollout order
(lit_dash now) and by length (as the buffer once did).

One rollout of the demo's shape (12 prompts, or ``--prompts``, x 8 completions of SmolLM2-135M on two-digit additions, the
real vLLM engine, temperature 1, 64 tokens), scored by the demo's reward, the completions the filter keeps
cut into ``--slices`` slices both ways. Per slice: its completions, their token lengths (min-max), the
mean reward and the share of negative advantages. Length goes with reward, so length-sorted slices give
the late steps mostly wrong answers.

    python benchmarks/mini_slices.py [--slices 2] [--seed 0] [--out mini_slices.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def describe(parts: list[list[int]], lengths: list[int], rewards, advantages) -> list[dict]:
    rows = []
    for k, part in enumerate(parts):
        if not part:
            rows.append({"slice": k, "completions": 0})
            continue
        rows.append(
            {
                "slice": k,
                "completions": len(part),
                "tokens_min": min(lengths[r] for r in part),
                "tokens_max": max(lengths[r] for r in part),
                "reward_mean": sum(float(rewards[r]) for r in part) / len(part),
                "negative_advantage_share": sum(float(advantages[r]) < 0 for r in part) / len(part),
            }
        )
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--slices", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--prompts", type=int, default=12, help="prompts in the rollout (the demo's 12)")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)

    from lit_dash.advantages import group_advantages, keep_mask
    from lit_dash.data.buffer import slice_rows
    from lit_dash.data.formatting import format_prompts
    from lit_dash.data.sources import load_problems
    from lit_dash.engines import SamplingConfig
    from lit_dash.engines.vllm_engine import VLLMEngine
    from lit_dash.models import resolve_model
    from lit_dash.rewards import math_rewards

    problems = load_problems(
        source="arithmetic",
        path=None,
        split="train",
        limit=None,
        seed=0,
        difficulty="add2",
        num_problems=2000,
    )
    problems = problems[args.seed * args.prompts : (args.seed + 1) * args.prompts]
    engine = VLLMEngine(
        resolve_model("smollm2-135m-instruct"), seed=args.seed, dtype="float32", kv_cache_gib=1.0
    )
    prompts = format_prompts(problems, engine.tokenizer, "chat", "Put your final answer within \\boxed{}.")
    result = engine.generate(prompts, 8, SamplingConfig(temperature=1.0, max_new_tokens=64))
    completions = result.completions
    answers = [problems[c.prompt_index].answer for c in completions]
    import torch

    rewards = torch.tensor(math_rewards([c.text for c in completions], answers, last_number_fallback=True))
    advantages = group_advantages(rewards, 8)
    kept = [i for i, k in enumerate(keep_mask(rewards, 8, 0.1).tolist()) if k]
    lengths = [len(c.token_ids) for c in completions]
    report = {
        "kept": len(kept),
        "sampled": len(completions),
        "rollout_order": describe(slice_rows(kept, args.slices), lengths, rewards, advantages),
        "by_length": describe(
            slice_rows(sorted(kept, key=lambda r: lengths[r]), args.slices), lengths, rewards, advantages
        ),
    }
    print(f"kept {len(kept)} of {len(completions)} completions, {args.slices} slices")
    print("| cut | slice | completions | tokens | mean reward | negative advantages |")
    print("|---|---|---|---|---|---|")
    for cut in ("rollout_order", "by_length"):
        for row in report[cut]:
            if row["completions"]:
                print(
                    f"| {cut} | {row['slice']} | {row['completions']} | {row['tokens_min']}-{row['tokens_max']} "
                    f"| {row['reward_mean']:.2f} | {row['negative_advantage_share']:.0%} |"
                )
    if args.out:
        args.out.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
