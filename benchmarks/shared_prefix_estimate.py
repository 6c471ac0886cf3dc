"""What shared-prefix training (``model.shared_prefix``) saves at the paper's shapes: an estimate, no GPU.

The paper's recipe (configs/paper/qwen05b_math_dash.yaml): Qwen2.5-0.5B, MATH train prompts as raw text
(at most 256 tokens), G = 4 completions each, up to 2,048 tokens (mean 530-640 in the paper). The prompt
lengths are measured here on ../shared/data's MATH train problems, formatted as the recipe formats them;
Qwen's tokenizer is not on these machines, so SmolLM2's (the embedded model's) counts the tokens, a proxy
(both are byte-level BPE tokenizers of similar English and LaTeX granularity).

Forward+backward FLOPs of one group (3 x forward), per row and packed, with Qwen2.5-0.5B's published
dimensions:

    linear   2 x non-embedding matmul weights x tokens encoded (per row: G (p + c); packed: p + G c)
    head     2 x hidden x vocab x completion tokens (the same both ways: completion positions only)
    attention 4 x layers x heads x head_dim x query-key pairs: per row G (p + c)^2 / 2 (causal); packed
             with the split attention p^2 / 2 + G (c p + c^2 / 2); with a dense 4-D mask (p + G c)^2

The step-level figure uses the paper's own phase costs (PAPER.md): of DASH's 6.6 h, 2.4 h were gradients
(36%), the rest inference, which shared-prefix training does not touch.

    .venv/bin/python benchmarks/shared_prefix_estimate.py            # prints a table, writes a JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"

# Qwen2.5-0.5B (its published config.json): hidden 896, 24 layers, 14 query / 2 key-value heads of 64,
# MLP 4,864, vocabulary 151,936, tied embeddings
QWEN05B = {
    "hidden": 896,
    "layers": 24,
    "heads": 14,
    "kv_heads": 2,
    "head_dim": 64,
    "mlp": 4864,
    "vocab": 151936,
}
GRADIENT_SHARE = 2.4 / 6.6  # PAPER.md: DASH's 6.6 h = about 4.2 h inference + 2.4 h gradients


def group_flops(p: float, c: float, g: int, dims: dict) -> dict[str, float]:
    """Forward+backward FLOPs of one group of ``g`` completions of ``c`` tokens behind a ``p``-token prompt."""
    d, layers, h, kv, hd, mlp = (
        dims[k] for k in ("hidden", "layers", "heads", "kv_heads", "head_dim", "mlp")
    )
    weights = layers * (d * h * hd + 2 * d * kv * hd + h * hd * d + 3 * d * mlp)
    head = 2 * d * dims["vocab"] * g * c
    pair = 4 * layers * h * hd  # QK^T and AV, one query-key pair
    per_row = 2 * weights * g * (p + c) + head + pair * g * (p + c) ** 2 / 2
    split = 2 * weights * (p + g * c) + head + pair * (p * p / 2 + g * (c * p + c * c / 2))
    dense = 2 * weights * (p + g * c) + head + pair * (p + g * c) ** 2
    return {"per_row": 3 * per_row, "shared_prefix": 3 * split, "dense_mask": 3 * dense}


def prompt_lengths(limit: int | None) -> list[int]:
    from transformers import AutoTokenizer

    from lit_dash.data.formatting import format_prompts
    from lit_dash.data.sources import load_problems
    from lit_dash.models import resolve_model

    problems = load_problems("math12k", path=str(DATA), split="train", limit=limit)
    tokenizer = AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))
    texts = format_prompts(problems, tokenizer, "raw")
    lengths = [len(ids) for ids in tokenizer(texts, add_special_tokens=False)["input_ids"]]
    return [n for n in lengths if n <= 256]  # the recipe's max_prompt_tokens drops longer prompts


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--group-size", type=int, default=4)
    parser.add_argument("--completion-tokens", default="64,256,585,1024,2048", help="mean completion lengths")
    parser.add_argument("--limit", type=int, default=None, help="MATH train problems to measure (all: 12k)")
    parser.add_argument("--out", default="benchmarks/results/shared_prefix_estimate.json")
    args = parser.parse_args(argv)
    lengths = prompt_lengths(args.limit)
    p = statistics.fmean(lengths)
    quantiles = statistics.quantiles(lengths, n=10)
    rows = []
    for c in (int(x) for x in args.completion_tokens.split(",")):
        flops = group_flops(p, c, args.group_size, QWEN05B)
        saving = 1 - flops["shared_prefix"] / flops["per_row"]
        rows.append({
            "completion_tokens": c,
            "tokens_saved": (args.group_size - 1) * p / (args.group_size * (p + c)),
            "forward_backward_speedup": flops["per_row"] / flops["shared_prefix"],
            "dense_mask_speedup": flops["per_row"] / flops["dense_mask"],
            "step_time_saved": GRADIENT_SHARE * saving,
        })  # fmt: skip
    print(
        f"MATH train prompts ({len(lengths)}, raw, SmolLM2's tokenizer as a proxy for Qwen's): mean {p:.0f} tokens, "
        f"median {statistics.median(lengths):.0f}, 10th-90th percentile {quantiles[0]:.0f}-{quantiles[-1]:.0f}; "
        f"G = {args.group_size}; Qwen2.5-0.5B FLOPs\n"
    )
    print(
        "| completion tokens (mean) | tokens encoded saved | forward+backward, split attention | with a dense 4-D mask | DASH step time saved (gradients 36%) |"
    )
    print("|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['completion_tokens']} | {r['tokens_saved']:.0%} | x{r['forward_backward_speedup']:.2f} | "
            f"x{r['dense_mask_speedup']:.2f} | {r['step_time_saved']:.1%} |"
        )
    report = {"prompt_tokens_mean": p, "prompt_tokens_deciles": quantiles, "group_size": args.group_size,
              "model_dims": QWEN05B, "gradient_share": GRADIENT_SHARE, "rows": rows}  # fmt: skip
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
