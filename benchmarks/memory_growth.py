"""Resident memory over a long run: does a fit leak?

Runs ``--steps`` optimizer steps of the tiny random Llama through the real CLI (real vLLM, rollouts,
backward, weight pushes, TensorBoard logging, a held-out evaluation and a checkpoint every 50 steps) and
prints this process's resident memory (``VmRSS`` from ``/proc/self/status``) every ``--every`` steps, then
the end's resident memory against step 20's, and the peak (``VmHWM``). The reward is text-length parity,
so groups are mixed and every step really trains (a random model never answers arithmetic).

    PYTHONPATH=. flock /tmp/cpu.lock .venv/bin/python benchmarks/memory_growth.py [--steps 200] [--every 20]
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import lightning as L

from lit_dash.hardware import process_memory_mib
from lit_dash.module import DashModule

BASELINE_STEP = 20

CONFIG = """
seed_everything: 0
trainer:
  accelerator: cpu
  devices: 1
  max_steps: {steps}
  default_root_dir: {root}
  enable_progress_bar: false
  limit_val_batches: 0
  log_every_n_steps: 1
  callbacks:
    - class_path: lit_dash.callbacks.StepCheckpoint
      init_args: {{every_n_train_steps: 50, save_last: true}}
    - class_path: lit_dash.callbacks.MathEvaluation
      init_args: {{every_n_steps: 50}}
    - class_path: lit_dash.callbacks.TimingProfile
    - class_path: __main__.MemoryProbe
      init_args: {{every: {every}}}
model:
  class_path: __main__.ParityReward
  init_args: {{model: tiny-llama, lr: 1.0e-4}}
data:
  train: {{source: arithmetic, difficulty: add2, num_problems: 400}}
  eval_sets:
    arithmetic: {{source: arithmetic, difficulty: add1, split: test, num_problems: 8}}
  prompts_per_rollout: 4
  group_size: 4
  micro_batch_size: 4
  filter_threshold: 0.1
  sampling: {{temperature: 1.0, max_new_tokens: 16}}
  eval_max_new_tokens: 16
  engine: {{kind: vllm, kv_cache_gib: 0.5}}
"""


class ParityReward(DashModule):
    def reward(self, completions, problems):
        return [float(len(c) % 2 == 0) for c in completions]


class MemoryProbe(L.Callback):
    def __init__(self, every: int = 20) -> None:
        self.every = every
        self.rows: list[tuple[int, float, float]] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step in (1, BASELINE_STEP) or step == trainer.max_steps:
            mem = process_memory_mib()
            self.rows.append((step, mem["VmRSS"], mem["VmHWM"]))
            print(
                f"[memory] step {step:4d}: VmRSS {mem['VmRSS']:7.0f} MiB  VmHWM {mem['VmHWM']:7.0f} MiB",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--every", type=int, default=20)
    args = parser.parse_args()
    if args.steps <= BASELINE_STEP:
        parser.error(f"--steps must be more than {BASELINE_STEP} (the baseline step)")

    from lit_dash.cli import build_cli

    with tempfile.TemporaryDirectory() as root:
        config = Path(root) / "memory.yaml"
        config.write_text(CONFIG.format(steps=args.steps, root=root, every=args.every))
        cli = build_cli(["fit", "--config", str(config)])
        probe = next(c for c in cli.trainer.callbacks if isinstance(c, MemoryProbe))
    rows = {step: (rss, hwm) for step, rss, hwm in probe.rows}
    base, end = rows[BASELINE_STEP][0], rows[args.steps][0]
    print("\n| step | VmRSS (MiB) | VmHWM (MiB) |\n|---|---|---|")
    for step, rss, hwm in probe.rows:
        print(f"| {step} | {rss:.0f} | {hwm:.0f} |")
    print(
        f"\nresident memory: step {BASELINE_STEP} {base:.0f} MiB, step {args.steps} {end:.0f} MiB, "
        f"ratio {end / base:.3f} ({(end / base - 1):+.1%}); peak (VmHWM) {rows[args.steps][1]:.0f} MiB"
    )


if __name__ == "__main__":
    main()
