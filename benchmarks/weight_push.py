"""Weight push into the in-process vLLM engine: fp32 master weights as they are (the push before weights
were cast) against ``VLLMEngine.load_weights`` (cast to the engine's dtype, rotary warning filtered).

Alternates the two pushes ``--repeats`` times and reports the median seconds and the vLLM warnings each
logged per push.

    .venv/bin/python benchmarks/weight_push.py [--model smollm2-135m-instruct] [--dtype bfloat16] [--repeats 7]
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time

import torch


class _Warnings(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--dtype", default="bfloat16", help="the engine's dtype (the policy is fp32)")
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    from transformers import AutoModelForCausalLM

    from lit_dash.engines.vllm_engine import VLLMEngine
    from lit_dash.models import resolve_model

    path = resolve_model(args.model)
    engine = VLLMEngine(path, seed=0, kv_cache_gib=0.5, max_model_len=512, dtype=args.dtype)
    state = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    runner = engine._model_runner()

    def uncast() -> None:  # what load_weights did before: fp32 tensors straight into reload_weights
        weights = [(k, v) for k, v in state.items() if k != "lm_head.weight"]
        if engine._tied:
            weights.append(("lm_head.weight", state["model.embed_tokens.weight"]))
        runner.reload_weights(weights_iterator=iter(weights))
        engine._llm.reset_prefix_cache()

    def cast() -> None:
        engine.load_weights(state.items())

    warnings = _Warnings()
    logging.getLogger("vllm").addHandler(warnings)
    results: dict[str, tuple[list[float], list[int]]] = {
        "before (uncast)": ([], []),
        "after (cast)": ([], []),
    }
    for _ in range(args.repeats):
        for name, push in (("before (uncast)", uncast), ("after (cast)", cast)):
            warnings.count = 0
            start = time.perf_counter()
            push()
            results[name][0].append(time.perf_counter() - start)
            results[name][1].append(warnings.count)
    print(f"| {args.model}, engine {args.dtype}, {args.repeats} pushes each | median s | warnings per push |")
    print("|---|---|---|")
    for name, (seconds, counts) in results.items():
        print(f"| {name} | {statistics.median(seconds):.3f} | {max(counts)} |")


if __name__ == "__main__":
    main()
