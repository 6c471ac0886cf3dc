"""Peak memory and time of ONE micro-batch forward + backward, unchunked vs token-chunked log-probs.

Builds a random Qwen2-like model from a transformers config (small hidden size, Qwen's 151,936-token
vocabulary, tied embeddings), saves it to a temporary folder and runs the real training path on it:
``DashModule.micro_batch_loss`` (log-probs + entropy at the sampling temperature, the policy loss) and its
backward, in float32 on the CPU, for a micro-batch of ``--rows`` completions of ``--prompt`` prompt +
``--completion`` completion tokens. Each configuration (completion length x ``logprob_chunk_tokens``) runs
in its own subprocess, so peaks do not mix: one warm-up step, then the peak resident memory is reset
(``/proc/self/clear_refs``) and the measured step's ``VmHWM - VmRSS`` before it is the peak it added
(with glibc's mmap threshold fixed at 64 KiB, so freed tensors leave the resident set).

An unchunked configuration whose estimated footprint (5 float32 copies of its ``[tokens, vocab]`` logits:
the logits, their tempered copy kept for backward, and the entropy's log-softmax, exp and product) is over
``--max-unchunked-gib`` is skipped, and said so in the table.

    PYTHONPATH=. flock /tmp/lit_dash_cpu.lock .venv/bin/python benchmarks/logprob_memory.py \\
        --completions 256,2048 --chunks 0,1024 --out benchmarks/results/logprob_memory_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GIB = 1024**3
# A fixed glibc mmap threshold: every allocation over 64 KiB is its own mapping, returned to the system when
# freed, so resident memory follows the live tensors. (By default the threshold grows after the first large
# free and freed tensors stay resident in malloc's heap: peaks then depend on what ran before.)
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}


def build_model(folder: Path, vocab: int, hidden: int, layers: int, context: int) -> None:
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    config = Qwen2Config(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=True,
    )
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)


def worker(args: argparse.Namespace) -> dict:
    """One configuration, in this process: warm-up step, reset the peak, measured step."""
    import torch

    from lit_dash.data.buffer import pad_micro_batch
    from lit_dash.hardware import process_memory_mib
    from lit_dash.module import DashModule

    torch.manual_seed(1)
    module = DashModule(model=args.model_dir, precision="float32", logprob_chunk_tokens=args.chunk)
    module.configure_model()
    vocab = module.policy.config.vocab_size
    seqs = [
        (
            torch.randint(0, vocab, (args.prompt,)).tolist(),
            torch.randint(0, vocab, (args.completion,)).tolist(),
        )
        for _ in range(args.rows)
    ]
    mb = pad_micro_batch(
        seqs, 0, torch.randn(args.rows), list(range(args.rows)), temperature=args.temperature
    )
    counts = module.step_counts([mb], max_new_tokens=args.completion)

    def step() -> float:
        module.policy.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss, _ = module.micro_batch_loss(mb, counts)
        loss.backward()
        return time.perf_counter() - start

    step()  # warm-up: first-call allocations, thread pools
    module.policy.zero_grad(set_to_none=True)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    before = process_memory_mib()["VmRSS"]
    seconds = step()
    peak = process_memory_mib()["VmHWM"]
    return {
        "completion_tokens": args.completion,
        "chunk_tokens": args.chunk,
        "tokens": int(mb.completion_mask.sum()),
        "peak_added_mib": round(peak - before, 1),
        "rss_before_mib": round(before, 1),
        "seconds": round(seconds, 3),
        "torch_threads": torch.get_num_threads(),
    }


def estimated_unchunked_gib(rows: int, completion: int, vocab: int) -> float:
    return 5 * rows * completion * vocab * 4 / GIB


def run(args: argparse.Namespace) -> dict:
    completions = [int(c) for c in args.completions.split(",")]
    chunks = [int(c) for c in args.chunks.split(",")]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        build_model(folder, args.vocab, args.hidden, args.layers, args.prompt + max(completions) + 8)
        for completion in completions:
            for chunk in chunks:
                estimate = estimated_unchunked_gib(args.rows, completion, args.vocab)
                if chunk == 0 and estimate > args.max_unchunked_gib:
                    rows.append(
                        {
                            "completion_tokens": completion,
                            "chunk_tokens": 0,
                            "tokens": args.rows * completion,
                            "skipped": f"estimated {estimate:.1f} GiB > --max-unchunked-gib {args.max_unchunked_gib}",
                        }
                    )
                    continue
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    "--model-dir",
                    str(folder),
                    "--chunk",
                    str(chunk),
                ]
                cmd += [
                    "--rows",
                    str(args.rows),
                    "--prompt",
                    str(args.prompt),
                    "--completion",
                    str(completion),
                ]
                cmd += ["--temperature", str(args.temperature)]
                env = {
                    **os.environ,
                    **MALLOC_ENV,
                    "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                }
                proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, env=env)
                if proc.returncode != 0:
                    raise RuntimeError(
                        f"config completion={completion} chunk={chunk} failed:\n{proc.stderr[-3000:]}"
                    )
                rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return {
        "what": "one micro-batch forward+backward of DashModule.micro_batch_loss, float32, CPU",
        "model": {"vocab": args.vocab, "hidden": args.hidden, "layers": args.layers, "kind": "random Qwen2"},
        "rows": args.rows,
        "prompt_tokens": args.prompt,
        "temperature": args.temperature,
        "machine": platform.processor() or platform.machine(),
        "results": rows,
    }


def table(report: dict) -> str:
    lines = [
        f"rows {report['rows']}, prompt {report['prompt_tokens']} tokens, vocab {report['model']['vocab']}, "
        f"hidden {report['model']['hidden']}, {report['model']['layers']} layers, T {report['temperature']}",
        "",
        "| completion tokens | tokens | logprob_chunk_tokens | peak added (MiB) | time (s) |",
        "|---|---|---|---|---|",
    ]
    for r in report["results"]:
        chunk = r["chunk_tokens"] or "unchunked"
        if "skipped" in r:
            lines.append(
                f"| {r['completion_tokens']} | {r['tokens']} | {chunk} | skipped: {r['skipped']} | |"
            )
        else:
            lines.append(
                f"| {r['completion_tokens']} | {r['tokens']} | {chunk} | {r['peak_added_mib']:.0f} | "
                f"{r['seconds']:.2f} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--prompt", type=int, default=256)
    parser.add_argument("--completions", default="256,2048", help="comma-separated completion lengths")
    parser.add_argument(
        "--chunks", default="0,1024", help="comma-separated logprob_chunk_tokens; 0 = unchunked"
    )
    parser.add_argument("--temperature", type=float, default=0.9)
    parser.add_argument("--max-unchunked-gib", type=float, default=10.0)
    parser.add_argument("--out", default=None, help="write the results JSON here")
    # one configuration in this process (the parent runs each in its own)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--chunk", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--completion", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    report = run(args)
    print(table(report))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
