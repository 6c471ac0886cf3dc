"""Fixed-seed float32 fits of the tiny model through the real vLLM engine, printed as sha256 checksums:
the proof that a refactor left the numerics bit for bit as they were (issue 23).

    PYTHONPATH=. python scripts/bitwise_fit.py

Each variant is a short fit (trainer and engine both float32, one CPU process, the same engine reset to
the initial weights before each fit) covering a training path: filtering + KL + several micro-batches,
PPO ``multi`` with TIS and token_mean, ``mini`` with packed micro-batches and ``normalize_over: kept``,
and LoRA with its adapter-disabled KL reference. Per variant it prints three checksums: the final policy
weights, every rollout's completion token ids, and every optimizer step's logged statistics (repr of
the floats). Run it before and after a change: every line must be identical.
"""

from __future__ import annotations

import hashlib
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning as L  # noqa: E402
import torch  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from lit_dash.data.datamodule import EngineConfig, ProblemSource, RolloutDataModule  # noqa: E402
from lit_dash.engines import SamplingConfig  # noqa: E402
from lit_dash.engines.vllm_engine import VLLMEngine  # noqa: E402
from lit_dash.models import resolve_model  # noqa: E402
from lit_dash.module import DashModule  # noqa: E402


class ParityReward(DashModule):
    """The tiny random model never answers arithmetic; text parity gives mixed groups, so a gradient."""

    def reward(self, completions, problems):
        return [float(len(c) % 2 == 0) for c in completions]


VARIANTS: dict[str, tuple[dict, dict, int]] = {  # name: (model knobs, data knobs, optimizer steps)
    "dash_filter_kl": (
        dict(kl_coef=0.05, kl_estimator="k3"),
        dict(filter_threshold=0.1, micro_batch_size=2),
        3,
    ),
    "multi_tis_token_mean": (
        dict(update="multi", ppo_epochs=2, tis_cap=2.0, loss_agg="token_mean", max_rollouts=2),
        dict(filter_threshold=0.1),
        -1,
    ),
    "mini_packed_kept": (
        dict(update="mini", ppo_mini_batches=2, normalize_over="kept", max_rollouts=2, kl_coef=0.02),
        dict(filter_threshold=None, max_tokens_per_micro_batch=120),
        -1,
    ),
    "lora_kl_seq_mean": (
        dict(lora={"r": 4}, kl_coef=0.05, loss_agg="seq_mean", lr=1e-3, logprob_chunk_tokens=8),
        dict(filter_threshold=0.1),
        2,
    ),
}


class Record(L.Callback):
    """Every rollout's completion token ids and every optimizer step's statistics."""

    def __init__(self) -> None:
        self.completions = hashlib.sha256()
        self.stats = hashlib.sha256()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for c in pl_module.last_rollout.completions:
            self.completions.update(repr(list(c.token_ids)).encode())
        for row in pl_module.update_stats:
            self.stats.update(repr(sorted(row.items())).encode())


def weights_sha256(module: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def run(name: str, engine: VLLMEngine, initial: dict) -> str:
    model_knobs, data_knobs, max_steps = VARIANTS[name]
    model_knobs, data_knobs = dict(model_knobs), dict(data_knobs)
    engine.load_weights(initial.items())  # every variant starts from the same engine weights
    L.seed_everything(0, verbose=False)
    module = ParityReward(model="tiny-llama", lr=model_knobs.pop("lr", 1e-4), precision="float32", seed=0,
                          **model_knobs)  # fmt: skip
    data = RolloutDataModule(
        train=ProblemSource(source="arithmetic", difficulty="add1", num_problems=40),
        instruction="Answer in one line.",
        prompts_per_rollout=4,
        group_size=4,
        micro_batch_size=data_knobs.pop("micro_batch_size", 4),
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=16),
        eval_max_new_tokens=16,
        engine=EngineConfig(kind="vllm", kv_cache_gib=0.5, dtype="float32"),
        **data_knobs,
    )
    data.engine = engine
    record = Record()
    trainer = L.Trainer(
        accelerator="cpu", devices=1, precision="32-true", max_steps=max_steps, max_epochs=-1,
        limit_val_batches=0, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[record],
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    policy = module.policy_for_export()
    return (
        f"{name}: steps {trainer.global_step} weights {weights_sha256(policy)} "
        f"completions {record.completions.hexdigest()} stats {record.stats.hexdigest()}"
    )


def main(names: list[str]) -> None:
    torch.use_deterministic_algorithms(True)
    path = resolve_model("tiny-llama")
    initial = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict()
    engine = VLLMEngine(path, seed=0, kv_cache_gib=0.5, max_model_len=512, dtype="float32")
    lines = [run(name, engine, initial) for name in names or VARIANTS]
    print("\n".join(f"bitwise {line}" for line in lines))


if __name__ == "__main__":
    main(sys.argv[1:])
