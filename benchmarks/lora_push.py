"""LoRA's weight push against full fine-tuning's, into the in-process vLLM engine: every weight of the
policy, against the merged weights of the adapted modules (plus fused siblings) that a LoRA sync sends.

    .venv/bin/python benchmarks/lora_push.py [--model smollm2-135m-instruct] [--r 16] [--repeats 5]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="float32", help="the engine's dtype")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from transformers import AutoModelForCausalLM

    from lit_dash import lora
    from lit_dash.callbacks.weight_sync import engine_weights
    from lit_dash.engines.vllm_engine import VLLMEngine
    from lit_dash.models import resolve_model

    path = resolve_model(args.model)
    engine = VLLMEngine(path, seed=0, kv_cache_gib=0.5, max_model_len=512, dtype=args.dtype)
    full = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    peft = lora.apply_lora(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), {"r": args.r})
    pushes = {"full fine-tuning (every weight)": full, f"LoRA r={args.r} (merged adapted modules)": peft}
    seconds: dict[str, list[float]] = {name: [] for name in pushes}
    sizes = {}
    for _ in range(args.repeats):
        for name, model in pushes.items():
            start = time.perf_counter()
            with torch.no_grad():
                weights = list(engine_weights(model, fsdp=False))
                engine.load_weights(weights)
            seconds[name].append(time.perf_counter() - start)
            sizes[name] = (len(weights), sum(t.numel() * t.element_size() for _, t in weights))
    print(f"| {args.model}, engine {args.dtype}, {args.repeats} pushes each | median s | tensors | MiB |")
    print("|---|---|---|---|")
    for name, s in seconds.items():
        print(f"| {name} | {statistics.median(s):.3f} | {sizes[name][0]} | {sizes[name][1] / 2**20:.0f} |")


if __name__ == "__main__":
    main()
