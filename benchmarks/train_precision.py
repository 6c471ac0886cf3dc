"""Training-step precision check and speed: fp32 against bf16 autocast (fp32 master weights).

Runs DashModule's own micro-batch loss (the code a training step runs) on random token micro-batches and
reports, per precision: forward+backward tokens/s, peak memory, and how far the bf16 loss and gradient are
from fp32's (relative loss error, gradient cosine similarity). Then the transformers engine's generation
throughput at several batch sizes. Meant for a GPU (where bf16 is native); on a CPU without native bf16
only fp32 is meaningful.

    python benchmarks/train_precision.py --model smollm2-135m-instruct
    python benchmarks/train_precision.py --model path/to/config_dir --random-init   # architecture only
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from lit_dash.data.buffer import MicroBatch
from lit_dash.engines import SamplingConfig, build_engine
from lit_dash.module import DashModule


def random_init_copy(config_dir: str) -> str:
    """A randomly initialised model of ``config_dir``'s architecture (for machines the weights can't reach)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out = tempfile.mkdtemp(prefix="random_init_")
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(config_dir)).save_pretrained(out)
    AutoTokenizer.from_pretrained(config_dir).save_pretrained(out)
    return out


def micro_batch(vocab: int, rows: int, prompt: int, completion: int, seed: int = 0) -> MicroBatch:
    g = torch.Generator().manual_seed(seed)
    width = prompt + completion
    ids = torch.randint(10, vocab, (rows, width), generator=g)
    mask = torch.zeros(rows, width - 1)
    mask[:, prompt - 1 :] = 1.0
    adv = torch.randn(rows, generator=g)
    return MicroBatch(ids, torch.ones(rows, width, dtype=torch.long), mask, adv, list(range(rows)))


def step_stats(module: DashModule, mb: MicroBatch, max_new: int, repeats: int, device: torch.device):
    counts = module.step_counts([mb], max_new)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    loss = None
    for i in range(repeats + 1):  # first call is a warm-up
        if i == 1:
            sync()
            start = time.perf_counter()
        module.policy.zero_grad(set_to_none=True)
        loss, _ = module.micro_batch_loss(mb, counts)
        loss.backward()
    sync()
    seconds = (time.perf_counter() - start) / repeats
    grad = torch.cat([p.grad.flatten().float() for p in module.policy.parameters() if p.grad is not None])
    # the on-policy loss value is sum(advantage)/n whatever the precision; the log-probs are not
    with torch.no_grad():
        logprobs, _ = module(mb)
        mean_logprob = float((logprobs * mb.completion_mask.to(device)).sum() / mb.completion_mask.sum())
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return mean_logprob, grad, mb.num_tokens / seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--random-init", action="store_true", help="random weights, the model's architecture")
    parser.add_argument("--rows", type=int, default=8, help="completions per micro-batch")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--completion-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--gen-batches", default="8,64,256", help="engine batch sizes (completions)")
    parser.add_argument("--gen-tokens", type=int, default=128)
    args = parser.parse_args()

    from lit_dash.models import resolve_model

    path = resolve_model(args.model)
    if args.random_init:
        path = random_init_copy(path)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name() if device.type == "cuda" else "cpu"
    print(f"device: {name}; model: {args.model}{' (random init)' if args.random_init else ''}")

    rows = []
    reference = None
    for precision in ("float32", "bfloat16"):
        module = DashModule(model=path, precision=precision, lr=1e-6)
        module.configure_model()
        module.to(device)
        mb = micro_batch(
            module.policy.config.vocab_size, args.rows, args.prompt_tokens, args.completion_tokens
        )
        loss, grad, tok_s, peak = step_stats(module, mb, args.completion_tokens, args.repeats, device)
        if reference is None:
            reference = (loss, grad)
        logprob_diff = abs(loss - reference[0])
        grad_err = float((grad - reference[1]).norm() / reference[1].norm().clamp_min(1e-30))
        cosine = float(torch.nn.functional.cosine_similarity(grad.double(), reference[1].double(), dim=0))
        rows.append((precision, tok_s, peak, loss, logprob_diff, grad_err, cosine))
        del module
        if device.type == "cuda":
            torch.cuda.empty_cache()

    print(
        f"\nforward+backward, micro-batch {args.rows} x ({args.prompt_tokens} prompt + "
        f"{args.completion_tokens} completion) tokens, mean of {args.repeats}"
    )
    print(
        "| training precision | train tokens/s | peak memory (GiB) | mean token log-prob | |diff| vs fp32 | "
        "grad rel. L2 error vs fp32 | grad cosine vs fp32 |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|")
    for precision, tok_s, peak, lp, diff, err, cos in rows:
        print(f"| {precision} | {tok_s:.0f} | {peak:.2f} | {lp:.4f} | {diff:.2e} | {err:.2e} | {cos:.6f} |")
    print(f"bf16/fp32 training speed: {rows[1][1] / rows[0][1]:.2f}x")

    engine = build_engine("hf", path, seed=0)
    batches = [int(b) for b in args.gen_batches.split(",") if b]
    engine.batch_size = max(batches)
    prompts = [f"Question {i}: what is {i} + {2 * i}?" for i in range(max(batches))]
    engine.generate(prompts[:8], 1, SamplingConfig(max_new_tokens=8, ignore_eos=True))
    print(f"\ntransformers generate ({engine.model.dtype}), {args.gen_tokens} new tokens, ignore_eos")
    print("| batch (completions) | seconds | tokens/s |")
    print("|---:|---:|---:|")
    for b in batches:
        start = time.perf_counter()
        result = engine.generate(
            prompts[:b], 1, SamplingConfig(max_new_tokens=args.gen_tokens, ignore_eos=True)
        )
        seconds = time.perf_counter() - start
        print(f"| {b} | {seconds:.2f} | {result.completion_tokens / seconds:.0f} |")


if __name__ == "__main__":
    main()
