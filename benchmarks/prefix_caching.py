"""Shared-prompt prefill: vLLM with prefix caching on vs off, on the demo's rollout shapes.

With G completions per prompt, prefix caching lets the G samples of a group share one prefill of the
prompt. This benchmark starts one engine per setting on the same model and seed, samples the same
rollouts (P prompts x G, the demo's sampling), checks that the completions are token-for-token the same,
and prints the generation time and tokens/s of each, with their ratio.

    python benchmarks/prefix_caching.py                       # SmolLM2-135M, demo shapes
    python benchmarks/prefix_caching.py --reverse             # the same, settings run last to first
    python benchmarks/prefix_caching.py --model tiny-llama --rollouts 1   # smoke test
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")


def _prompts(tokenizer, count: int, seed: int) -> list[str]:
    from lit_dash.data.formatting import format_prompts
    from lit_dash.data.sources import load_problems

    problems = load_problems("arithmetic", split="train", difficulty="add2", num_problems=count, seed=seed)
    return format_prompts(problems, tokenizer, "chat", "Put your final answer within \\boxed{}.")


SETTINGS = {
    "off": (False, None),
    "on": (True, None),
    "off, block 32": (False, 32),
    "on, block 32": (True, 32),
}
# caching must not change a sample: compared at the same KV block size (a block size is a different
# attention kernel layout, whose rounding alone may change samples)
SAME_BLOCK = (("off", "on"), ("off, block 32", "on, block 32"))


def run(
    setting: tuple[bool, int | None],
    model: str,
    rollouts: int,
    prompts: int,
    group: int,
    max_new: int,
    dtype: str,
):
    from lit_dash.engines import SamplingConfig
    from lit_dash.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(
        model,
        seed=0,
        kv_cache_gib=2.0,
        max_model_len=256,
        dtype=dtype,
        prefix_caching=setting[0],
        block_size=setting[1],
    )
    texts = _prompts(engine.tokenizer, prompts * rollouts, seed=0)
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=max_new)
    engine.generate(texts[:prompts], group, sampling)  # warm-up, not timed
    seconds, tokens, samples = 0.0, 0, []
    for r in range(rollouts):
        start = time.perf_counter()
        result = engine.generate(texts[r * prompts : (r + 1) * prompts], group, sampling, want_logprobs=True)
        seconds += time.perf_counter() - start
        tokens += sum(len(c.token_ids) for c in result.completions)
        samples.append([c.token_ids for c in result.completions])
    engine.close()
    del engine
    gc.collect()
    return {"seconds": seconds, "completion_tokens": tokens, "tokens_per_s": tokens / seconds}, samples


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--rollouts", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--group", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--out", default="benchmarks/results/prefix_caching.json")
    parser.add_argument(
        "--reverse", action="store_true", help="run the settings last to first (to see an order effect)"
    )
    args = parser.parse_args(argv)
    from lit_dash.models import resolve_model

    path = resolve_model(args.model)
    shape = (path, args.rollouts, args.prompts, args.group, args.max_new_tokens, args.dtype)
    order = list(SETTINGS.items())[:: -1 if args.reverse else 1]
    runs = {name: run(setting, *shape) for name, setting in order}
    runs = {name: runs[name] for name in SETTINGS}  # the table in the usual order either way
    identical = {f"{a} = {b}": runs[a][1] == runs[b][1] for a, b in SAME_BLOCK}
    same = all(identical.values())
    result = {
        "model": args.model,
        "dtype": args.dtype,
        "machine": platform.processor() or platform.machine(),
        "shape": {
            "rollouts": args.rollouts,
            "prompts": args.prompts,
            "group": args.group,
            "max_new_tokens": args.max_new_tokens,
        },
        "run_order": [name for name, _ in order],
        "settings": {name: timing for name, (timing, _) in runs.items()},
        "identical_completions": same,
        "identical_by_pair": identical,
    }
    off_of = {b: a for a, b in SAME_BLOCK} | {a: a for a, _ in SAME_BLOCK}  # each setting's "off"
    print(
        "| prefix caching | generation s | completion tokens | tok/s | tok/s vs off at its block size |\n"
        "|---|---|---|---|---|"
    )
    for name, (r, _) in runs.items():
        off = runs[off_of[name]][0]["tokens_per_s"]
        print(
            f"| {name} | {r['seconds']:.2f} | {r['completion_tokens']} | {r['tokens_per_s']:.0f} | "
            f"x{r['tokens_per_s'] / off:.2f} |"
        )
    for pair, equal in identical.items():
        print(f"completions token-for-token identical, {pair}: {equal}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
