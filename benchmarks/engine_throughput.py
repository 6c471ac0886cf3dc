"""Generation throughput: the vLLM engine against the transformers fallback, same prompts, same model.

Prompts are real GSM8K test questions in the chat template; sampling is temperature 1.0 with
``ignore_eos`` so every completion is exactly ``--max-new-tokens`` long. Each engine gets one warm-up
call, then each batch size is timed ``--repeats`` times and the best run is reported.

    .venv/bin/python benchmarks/engine_throughput.py [--batch-sizes 8,32,64,128] [--json rows.json]
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from lit_dash.data.formatting import format_prompts
from lit_dash.data.sources import load_problems
from lit_dash.engines import Engine, SamplingConfig, build_engine
from lit_dash.hardware import resolve_dtype
from lit_dash.models import resolve_model

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "gsm8k_test.jsonl"


def _sizes(text: str) -> list[int]:
    return sorted({int(s) for s in text.split(",") if s.strip()})


def kv_cache_gib(model_path: str, sequences: int, max_model_len: int, dtype: torch.dtype) -> float:
    """KV cache that holds ``sequences`` full-length sequences at once (at least 1 GiB)."""
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_path)
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * dtype.itemsize
    return max(1.0, round(sequences * max_model_len * per_token / 2**30 + 0.25, 2))


def time_engine(
    name: str, engine: Engine, prompts: list[str], batches: list[int], max_new: int, repeats: int
) -> list[dict[str, float | int | str]]:
    """Warm up once, then the best of ``repeats`` timed calls per batch size."""
    engine.generate(
        prompts[: batches[0]], 1, SamplingConfig(temperature=1.0, max_new_tokens=16, ignore_eos=True)
    )
    sampling = SamplingConfig(temperature=1.0, max_new_tokens=max_new, ignore_eos=True)
    rows: list[dict[str, float | int | str]] = []
    for batch in batches:
        best: tuple[float, int] | None = None
        for _ in range(repeats):
            start = time.perf_counter()
            result = engine.generate(prompts[:batch], 1, sampling)
            seconds = time.perf_counter() - start
            if best is None or seconds < best[0]:
                best = (seconds, result.completion_tokens)
        assert best is not None
        seconds, tokens = best
        rows.append(
            {
                "engine": name,
                "batch": batch,
                "tokens": tokens,
                "seconds": seconds,
                "tokens_per_s": tokens / seconds,
            }
        )
        print(
            f"  {name} batch {batch}: {tokens} tokens in {seconds:.1f}s ({tokens / seconds:.1f} tok/s)",
            flush=True,
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, local folder or hub id")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="GSM8K test JSONL")
    parser.add_argument("--batch-sizes", type=_sizes, default=_sizes("8,32,64,128"), help="vLLM batches")
    parser.add_argument("--hf-batch-sizes", type=_sizes, default=_sizes("64"), help="transformers batches")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kv-cache-gib", type=float, default=None, help="vLLM CPU KV cache (default: sized)")
    parser.add_argument("--json", type=Path, default=None, help="write the rows here as JSON")
    args = parser.parse_args()

    from transformers import AutoTokenizer

    model_path = resolve_model(args.model)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = resolve_dtype("auto", device)
    largest = max(args.batch_sizes + args.hf_batch_sizes, default=1)
    problems = load_problems("gsm8k", path=str(args.data), split="test", limit=largest)
    prompts = format_prompts(problems, AutoTokenizer.from_pretrained(model_path))
    prompts = [prompts[i % len(prompts)] for i in range(largest)]
    max_model_len = 512 + args.max_new_tokens
    kv_gib = args.kv_cache_gib or kv_cache_gib(
        model_path, max(args.batch_sizes, default=1), max_model_len, dtype
    )

    rows: list[dict[str, float | int | str]] = []
    if args.batch_sizes:
        vllm = build_engine(
            "vllm", model_path, seed=args.seed, kv_cache_gib=kv_gib, max_model_len=max_model_len
        )
        rows += time_engine("vllm", vllm, prompts, args.batch_sizes, args.max_new_tokens, args.repeats)
        vllm.close()
        del vllm
    if args.hf_batch_sizes:
        hf = build_engine("hf", model_path, seed=args.seed)
        hf.batch_size = max(args.hf_batch_sizes)  # one generate call per timed batch
        rows += time_engine(
            "transformers", hf, prompts, args.hf_batch_sizes, args.max_new_tokens, args.repeats
        )

    print(
        f"\nmachine: {os.cpu_count()} CPUs, device {device}, dtype {str(dtype).removeprefix('torch.')}; "
        f"model: {args.model}; max_new_tokens: {args.max_new_tokens}; vLLM KV cache {kv_gib} GiB\n"
    )
    print("| engine | batch (completions) | tokens | seconds | tokens/s |")
    print("|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['engine']} | {r['batch']} | {r['tokens']} | {r['seconds']:.2f} | {r['tokens_per_s']:.1f} |"
        )

    by = {(r["engine"], r["batch"]): float(r["tokens_per_s"]) for r in rows}
    common = sorted(set(args.batch_sizes) & set(args.hf_batch_sizes))
    if common:
        at = 64 if 64 in common else common[-1]
        if at != 64:
            print(f"(batch 64 not measured for both engines; ratio at batch {at})")
        print(f"vLLM/transformers throughput ratio: {by[('vllm', at)] / by[('transformers', at)]:.1f}")
    else:
        print("vLLM/transformers throughput ratio: n/a (no batch size measured for both engines)")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
