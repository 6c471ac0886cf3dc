"""What a checkpoint write costs the training loop, written in the loop (AtomicCheckpointIO) or in the
background (BackgroundCheckpointIO, ``StepCheckpoint(background_writes: true)``).

The checkpoint is the real thing's shape: the model's fp32 weights and two AdamW moments per weight
(what a full fine-tuning step checkpoint holds). Measured, in one process:
- the in-loop write: wall time of ``save_checkpoint`` (temporary file, fsync, rename);
- the background write: time the caller is blocked (the snapshot), and time until the file is on disk;
- the interference: a fixed training workload (forward + backward of the model on a micro-batch, the same
  iterations each time) alone, and while a background write runs: how much slower the loop gets.
The loop's cost of a checkpoint is the in-loop write's wall time, or the snapshot plus the slow-down.

    .venv/bin/python benchmarks/checkpoint_writes.py                       # SmolLM2-135M
    .venv/bin/python benchmarks/checkpoint_writes.py --model tiny-llama    # smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import threading
import time
from pathlib import Path

import torch


def _workload(model, ids: torch.Tensor, iterations: int) -> float:
    start = time.perf_counter()
    for _ in range(iterations):
        model(input_ids=ids).logits.float().logsumexp(-1).mean().backward()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--micro-batch", type=int, default=16, help="sequences per forward + backward")
    parser.add_argument("--tokens", type=int, default=115, help="tokens per sequence (demo: ~51 + 64)")
    parser.add_argument("--out", default=None, help="a JSON of the figures")
    args = parser.parse_args()

    from transformers import AutoModelForCausalLM

    from lit_dash.callbacks.atomic_io import AtomicCheckpointIO
    from lit_dash.callbacks.background_io import BackgroundCheckpointIO
    from lit_dash.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model(args.model), dtype=torch.float32)
    state = {f"policy.{k}": v for k, v in model.state_dict().items()}
    moments = {
        i: {"exp_avg": torch.randn_like(p), "exp_avg_sq": torch.rand_like(p)}
        for i, p in enumerate(model.parameters())
    }
    checkpoint = {"global_step": 4, "state_dict": state, "optimizer_states": [{"state": moments}]}
    nbytes = sum(v.nbytes for v in state.values()) + sum(
        t.nbytes for m in moments.values() for t in m.values()
    )
    ids = torch.randint(0, model.config.vocab_size, (args.micro_batch, args.tokens))
    _workload(model, ids, 1)  # warm-up
    # a workload about as long as one in-loop write, so the background write overlaps all of it
    sync_s, snapshot_s, background_s, alone_s, overlapped_s = [], [], [], [], []
    with tempfile.TemporaryDirectory(dir=".") as tmp:
        for r in range(args.repeats):
            start = time.perf_counter()
            AtomicCheckpointIO().save_checkpoint(checkpoint, Path(tmp) / f"sync{r}.ckpt")
            sync_s.append(time.perf_counter() - start)
        one = _workload(model, ids, 1)
        iterations = max(1, round(statistics.median(sync_s) / one))
        for r in range(args.repeats):
            alone_s.append(_workload(model, ids, iterations))
            io = BackgroundCheckpointIO()
            done = threading.Event()
            start = time.perf_counter()
            io.save_checkpoint(checkpoint, Path(tmp) / f"bg{r}.ckpt")
            snapshot_s.append(time.perf_counter() - start)
            io.after_queued_writes(done.set)
            overlapped_s.append(_workload(model, ids, iterations))
            io.wait()
            background_s.append(time.perf_counter() - start)
            io.teardown()
            assert done.is_set()
    med = statistics.median
    slowdown = med(overlapped_s) - med(alone_s)
    loop_cost_bg = med(snapshot_s) + max(0.0, slowdown)
    flags = sorted(
        f for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16") if f in Path("/proc/cpuinfo").read_text()
    )
    print(f"checkpoint: {nbytes / 2**20:.0f} MiB ({args.model} fp32 weights + AdamW moments); "
          f"{torch.get_num_threads()} threads; CPU flags {flags}; medians of {args.repeats}")  # fmt: skip
    print("| | seconds |")
    print("|---|---|")
    print(f"| in-loop write (AtomicCheckpointIO): the loop waits | {med(sync_s):.2f} |")
    print(f"| background write: snapshot, the loop waits | {med(snapshot_s):.2f} |")
    print(f"| background write: until the file is on disk | {med(background_s):.2f} |")
    print(
        f"| training workload ({iterations} x fwd+bwd, {args.micro_batch}x{args.tokens} tokens) alone | {med(alone_s):.2f} |"
    )
    print(f"| the same workload during the background write | {med(overlapped_s):.2f} |")
    print(f"| the loop's cost of one checkpoint: in-loop | {med(sync_s):.2f} |")
    print(f"| the loop's cost of one checkpoint: background (snapshot + slow-down) | {loop_cost_bg:.2f} |")
    print(f"background / in-loop cost: {loop_cost_bg / med(sync_s):.2f}")
    if args.out:
        Path(args.out).write_text(json.dumps({
            "model": args.model, "bytes": nbytes, "cpu": platform.processor(), "cpu_flags": flags,
            "in_loop_s": sync_s, "snapshot_s": snapshot_s, "background_total_s": background_s,
            "workload_alone_s": alone_s, "workload_overlapped_s": overlapped_s,
            "loop_cost_background_s": loop_cost_bg,
        }, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
