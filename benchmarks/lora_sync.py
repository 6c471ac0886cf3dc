"""How a LoRA policy should reach vLLM, measured: merged weights pushed into a plain engine (lit_dash's
choice) against vLLM's own LoRA path (an engine started with ``enable_lora``, the adapter saved to a
folder and sent as a ``LoRARequest`` under a new id each step, as a trainer must after each update).

For each method and each of ``--steps`` simulated optimizer steps (fresh random adapter weights every
step, so the engine cannot serve a cached adapter): the sync's wall time, then one rollout of the demo's
shape (P prompts x G completions, T=1, <= N new tokens) and its completion tok/s. Last, both engines score
the same sequences: the log-prob gap between them says whether both serve base + the same adapter, and
a control (the merged engine before its push, i.e. the base) shows the gap can be large.

    .venv/bin/python benchmarks/lora_sync.py                        # SmolLM2-135M, demo shapes
    .venv/bin/python benchmarks/lora_sync.py --model tiny-llama --prompts 2 --steps 1   # smoke
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")

import torch  # noqa: E402
from prefix_caching import _prompts  # noqa: E402  (benchmarks/ is the script's folder)


def _randomise_adapters(policy: torch.nn.Module, step: int) -> None:
    """New adapter weights, as an optimizer step would give (B nonzero, so the adapter matters)."""
    gen = torch.Generator().manual_seed(1000 + step)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--kv-cache-gib", type=float, default=1.0)
    parser.add_argument("--out", default="benchmarks/results/lora_sync_cpu.json")
    args = parser.parse_args()

    import vllm
    from transformers import AutoModelForCausalLM

    from lit_dash import lora
    from lit_dash.engines.base import SamplingConfig
    from lit_dash.engines.vllm_engine import VLLMEngine
    from lit_dash.models import resolve_model

    path = resolve_model(args.model)
    dtype = "float32"  # the trainer's dtype here; the gap check wants both engines in it
    spec = {"r": args.r}
    policy = lora.apply_lora(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32), spec)
    sampling = SamplingConfig(temperature=1.0, top_p=1.0, top_k=-1, max_new_tokens=args.max_new_tokens)
    results: dict[str, dict] = {}
    scored: dict[str, list[list[float]]] = {}

    # --- merged push into a plain engine (lit_dash's WeightSync under LoRA)
    engine = VLLMEngine(path, seed=0, kv_cache_gib=args.kv_cache_gib, max_model_len=512, dtype=dtype)
    prompts = _prompts(engine.tokenizer, args.prompts, seed=0)
    syncs, rates = [], []
    for step in range(args.steps):
        _randomise_adapters(policy, step)
        start = time.perf_counter()
        engine.load_weights(lora.merged_adapted_weights(policy))
        syncs.append(time.perf_counter() - start)
        out = engine.generate(prompts, args.group_size, sampling, want_logprobs=True)
        rates.append(sum(len(c.token_ids) for c in out.completions) / out.seconds)
    scored["merged"] = [
        (out.prompt_token_ids[c.prompt_index], c.token_ids, c.logprobs) for c in out.completions[:8]
    ]
    results["merged push (plain engine)"] = {"sync_s": syncs, "generation_tok_per_s": rates}
    del engine
    gc.collect()

    # --- vLLM's LoRA path: the adapter saved to a folder, a LoRARequest with a new id each step
    llm = vllm.LLM(
        model=path, seed=0, dtype=dtype, kv_cache_memory_bytes=int(args.kv_cache_gib * 2**30),
        max_model_len=512, enforce_eager=True, enable_lora=True, max_lora_rank=args.r, max_loras=1,
        logprobs_mode="processed_logprobs",
    )  # fmt: skip
    params = vllm.SamplingParams(
        n=args.group_size, temperature=1.0, top_p=1.0, max_tokens=args.max_new_tokens, logprobs=0
    )
    syncs, rates = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for step in range(args.steps):  # the same adapter weights as the merged run's steps
            _randomise_adapters(policy, step)
            start = time.perf_counter()
            folder = lora.save_adapter(policy, Path(tmp) / str(step))
            request = vllm.lora.request.LoRARequest(f"step{step}", step + 1, str(folder))
            # the engine loads an adapter on its first request: one token of a short prompt
            llm.generate(["1"], vllm.SamplingParams(max_tokens=1), lora_request=request, use_tqdm=False)
            syncs.append(time.perf_counter() - start)
            start = time.perf_counter()
            outputs = llm.generate(prompts, params, lora_request=request, use_tqdm=False)
            seconds = time.perf_counter() - start
            rates.append(sum(len(s.token_ids) for o in outputs for s in o.outputs) / seconds)
    # (prompt_logprobs scoring under enable_lora fails on the CPU backend in vLLM 0.32: an einsum shape
    # error in the LoRA logits processor; so the check uses the sampled tokens' log-probs, as the
    # trainer's parity guard does)
    scored["vllm_lora"] = [
        (
            list(o.prompt_token_ids),
            list(s.token_ids),
            [lp[t].logprob for lp, t in zip(s.logprobs, s.token_ids, strict=True)],
        )
        for o in outputs
        for s in o.outputs
    ][:8]
    results["vLLM LoRARequest (enable_lora)"] = {"sync_s": syncs, "generation_tok_per_s": rates}

    def gap(samples, model) -> float:
        """Max |engine log-prob - trainer log-prob| over the sampled tokens, the trainer being ``model``."""
        worst = 0.0
        with torch.no_grad():
            for prompt_ids, token_ids, logprobs in samples:
                ids = torch.tensor([prompt_ids + token_ids])
                logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1 : -1]
                ours = torch.log_softmax(logits.float(), -1).gather(-1, torch.tensor(token_ids)[:, None])[
                    :, 0
                ]
                worst = max(worst, (ours - torch.tensor(logprobs)).abs().max().item())
        return worst

    with policy.disable_adapter():  # the control: the base alone is far from what either engine served
        control = gap(scored["vllm_lora"], policy)
    gaps = {
        "merged push vs trainer (base + adapter)": gap(scored["merged"], policy),
        "vLLM LoRA vs trainer (base + adapter)": gap(scored["vllm_lora"], policy),
        "control: vLLM LoRA vs the base alone": control,
    }
    flags = sorted(
        f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in Path("/proc/cpuinfo").read_text()
    )
    print(f"| {args.model}, r={args.r}, fp32, {args.prompts}x{args.group_size} completions <= "
          f"{args.max_new_tokens} tokens, {args.steps} steps | sync s (median) | generation tok/s (median) |")  # fmt: skip
    print("|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {statistics.median(r['sync_s']):.3f} | {statistics.median(r['generation_tok_per_s']):.0f} |"
        )
    merged, native = results.values()
    ratio = statistics.median(native["generation_tok_per_s"]) / statistics.median(
        merged["generation_tok_per_s"]
    )
    print(f"vLLM LoRA / merged generation tok/s: {ratio:.2f}")
    for name, value in gaps.items():
        print(f"max |log-prob gap| {name}: {value:.2e}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "results": results, "gaps": gaps, "cpu_flags": flags,
                               "generation_ratio": ratio}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
