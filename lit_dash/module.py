"""The LightningModule: policy (trainable), frozen reference (only when kl_coef > 0), the reward hook,
and one optimizer step per rollout (DASH), or K passes / S mini-batch steps (PPO "multi" / "mini").

Optimisation is manual because the number of micro-batches that survive filtering changes every step.
The loss of a step is normalised by step-wide counts, so it is the same however the kept completions
were split into micro-batches.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.strategies import DeepSpeedStrategy
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.distributed.fsdp import FullyShardedDataParallel
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel
from transformers import AutoModelForCausalLM

from lit_dash import losses
from lit_dash.checkpointing import restore_rng_states, rng_states_by_rank
from lit_dash.data.buffer import MicroBatch, Rollout
from lit_dash.data.records import Problem
from lit_dash.errors import ConfigError, RunStopped
from lit_dash.evaluation import EvalResult, shard, summarize, unshard, write_jsonl
from lit_dash.hardware import resolve_dtype
from lit_dash.lora import apply_lora, is_lora, lora_config, parameter_bytes
from lit_dash.models import check_model_name, resolve_model
from lit_dash.rewards import math_rewards
from lit_dash.training.gap_trend import GapTrend
from lit_dash.world_metrics import world_values

UPDATE_MODES = ("dash", "multi", "mini")
NORMALIZE_OVER = ("rollout", "kept")
PARITY_CHECKS = ("warn", "error", "off")
# Default parity thresholds (mean |engine - trainer| log-prob per token, nats), measured on the
# SmolLM2-135M model at temperatures 0.7-1.3: fp32 engine + fp32 trainer 6e-6; a bf16 engine (trainer
# fp32 or bf16) 0.03-0.05; fp32 with top-k 50 at T 0.9 0.03 (the truncated mass alone). A wrong
# temperature gave 0.3-0.7, weights off by N(0, 1e-3) noise 0.05-0.07.
PARITY_THRESHOLD_FP32 = 0.02
PARITY_THRESHOLD_LOW_PRECISION = 0.1


class NonFiniteLossError(RunStopped):
    """Several optimizer steps in a row had a NaN or infinite loss or gradient."""


class EngineParityError(RunStopped):
    """The engine's log-probs of its own samples are far from the policy's: it is not sampling from the
    policy being trained."""


def default_parity_threshold(
    precision: torch.dtype, engine_dtype: torch.dtype | None, truncated: bool = False
) -> float:
    """The parity threshold when none is set: tight when trainer and engine both compute in fp32 and
    sampling is not truncated; looser when either rounds to 16 bits (an unknown engine dtype counts as
    16-bit) or top-k / top-p truncate sampling (the removed mass then counts in the gap)."""
    if precision == torch.float32 and engine_dtype in (torch.float32, torch.float64) and not truncated:
        return PARITY_THRESHOLD_FP32
    return PARITY_THRESHOLD_LOW_PRECISION


class DashModule(L.LightningModule):
    """GRPO-family policy optimisation with DASH's one-step-per-rollout update.

    Args:
        model: alias (smollm2-135m-instruct, tiny-llama), local transformers folder, or hub id.
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay.
        warmup_steps: linear warm-up (optimizer steps).
        lr_schedule: linear (decay to 0 at trainer.max_steps) or constant.
        max_grad_norm: clip the gradient to this norm, the norm of the whole model's gradient over all ranks
            (FSDP: all shards together); null disables. train/grad_norm logs the norm before clipping.
        kl_coef: weight of the KL penalty to the frozen initial model; 0 loads no reference model.
        kl_estimator: k1, k2 or k3 (per token).
        loss_agg: constant (Dr. GRPO / the paper: sum / (completions x max_new_tokens)),
            token_mean (DAPO) or seq_mean (GRPO).
        normalize_over: which completions the loss's denominators count (completions, tokens or
            sequences, by loss_agg): rollout (every completion sampled for the step, before filtering: a
            dropped completion weighs as a kept one with zero advantage, so at kl_coef 0 dropping
            zero-advantage completions leaves the gradient exactly as it was; a prompt skipped by
            data.prompt_skipping counts as G such completions, exactly with loss_agg constant or seq_mean,
            at the rollout's mean sampled length with token_mean) or kept (only those that
            survived filtering: the gradient grows by sampled / kept). In update=mini each step's slice
            counts 1/ppo_mini_batches of the rollout's sampled completions (rollout) or its own (kept).
        scale_rewards: divide advantages by the group's std (GRPO) or not (Dr. GRPO).
        clip_eps_low: PPO ratio clip below 1 (only binds off-policy: multi / mini).
        clip_eps_high: PPO ratio clip above 1 (DAPO clip-higher when larger than clip_eps_low).
        update: dash (one optimizer step per rollout), multi (ppo_epochs passes over the rollout, one step
            each) or mini (ppo_mini_batches optimizer steps, each on a slice of the rollout).
        ppo_epochs: passes for update=multi.
        ppo_mini_batches: optimizer steps per rollout for update=mini, each on one of as many slices of the
            kept completions (a slice with nothing kept is a counted no-op step).
        max_rollouts: the training budget in rollouts (prompt batches), whatever the update mode: sets
            trainer.max_steps to max_rollouts x optimizer steps per rollout (1, ppo_epochs or
            ppo_mini_batches) and the linear LR schedule's length; null leaves trainer.max_steps in charge.
        precision: auto (bf16 autocast where the hardware has native bf16, else fp32), bfloat16 or float32.
            Weights stay fp32 (master weights) either way.
        gradient_checkpointing: trade compute for activation memory.
        answer_fallback: the default reward also accepts the last number of a completion with no
            ``\\boxed{}`` answer (off in the paper's recipes; on in the demo, for a 135M model that rarely boxes).
        require_final_form: the default reward pays only answers in final form; ``\\boxed{23 + 73}`` for 96
            scores 0 (false: math_verify's lenient equivalence, which pays it; see rewards/final_form.py).
        seed: engine and prompt-order seed; null uses seed_everything's.
        max_nonfinite_steps: a step whose loss or gradient is NaN or infinite is skipped (no update,
            counted as train/nonfinite_steps); this many in a row stop the run.
        model_cache: where converted models are cached (default ~/.cache/lit_dash or $LIT_DASH_CACHE).
        parity_check: every step compares the log-prob the engine gave each sampled token with the
            policy's (first forward of the step, before the update; a step that keeps nothing runs one
            forward on a micro-batch of the dropped completions; logged as train/engine_logprob_gap,
            mean, and train/engine_logprob_gap_max); above parity_threshold, ``warn``, ``error`` (stop the
            run) or ``off`` (log only).
        parity_threshold: mean absolute log-prob gap per token (nats) that counts as a mismatch; null:
            0.02 when the trainer (precision) and the engine (dtype) both compute in float32 and sampling
            has no top-k / top-p, else 0.1.
        lora: LoRA adapters (peft): ``{r, alpha, dropout, target_modules}`` (defaults 16, 2r, 0.0, the
            seven attention and MLP projections); only the adapters train and get optimizer state, the
            engine serves base + adapter (merged weights of the adapted modules, pushed each step), a
            checkpoint holds the adapters alone, and with kl_coef > 0 the reference is the base with the
            adapters disabled (no second model). null (default): full fine-tuning. Keep dropout 0 with
            the parity guard: dropout noise counts in the trainer's side of the gap.
        tis_cap: truncated importance sampling: weight each token's policy-gradient term by
            min(pi_old / pi_engine, tis_cap) (detached), correcting for an engine that samples from a
            slightly different distribution than the trainer computes (a bf16 engine beside an fp32
            trainer, large train/engine_logprob_gap); null (default) leaves the loss as it is.
        logprob_chunk_tokens: completion tokens per chunk of the LM head + log-softmax (log-probs, entropy,
            KL's reference, PPO's old log-probs): each chunk's ``[chunk, V]`` logits are recomputed in
            backward instead of kept, so a micro-batch's peak grows with chunk x vocabulary, not its
            tokens x vocabulary (8 x 2048 tokens of Qwen's 152k vocabulary: 10 GB per float32 copy). A
            micro-batch whose completion tokens fit one chunk is not recomputed (the same peak, one
            LM-head matmul less). 0 or null: unchunked (all ``[N, V]`` logits at once, kept for backward; a little faster).

    Log-probs, entropy, KL and the PPO ratio are all computed at the rollout's sampling temperature T
    (``log_softmax(logits / T)``; T = 0, greedy, counts as 1), from the full softmax: top-k / top-p
    truncation is not applied, so with them the parity gap includes the truncated probability mass.
    """

    def __init__(
        self,
        model: str = "smollm2-135m-instruct",
        lr: float = 1e-5,
        weight_decay: float = 0.0,
        warmup_steps: int = 0,
        lr_schedule: str = "linear",
        max_grad_norm: float | None = 1.0,
        kl_coef: float = 0.0,
        kl_estimator: str = "k3",
        loss_agg: str = "constant",
        normalize_over: str = "rollout",
        scale_rewards: bool = True,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        update: str = "dash",
        ppo_epochs: int = 1,
        ppo_mini_batches: int = 1,
        max_rollouts: int | None = None,
        precision: str = "auto",
        gradient_checkpointing: bool = False,
        answer_fallback: bool = False,
        require_final_form: bool = True,
        seed: int | None = None,
        model_cache: str | None = None,
        max_nonfinite_steps: int = 3,
        parity_check: str = "warn",
        parity_threshold: float | None = None,
        tis_cap: float | None = None,
        logprob_chunk_tokens: int | None = 1024,
        lora: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        errors = []
        if kl_coef < 0:
            errors.append(f"kl_coef must be >= 0, got {kl_coef}")
        if kl_estimator not in losses.KL_ESTIMATORS:
            errors.append(f"kl_estimator must be one of {tuple(losses.KL_ESTIMATORS)}, got {kl_estimator!r}")
        if loss_agg not in losses.LOSS_AGG_MODES:
            errors.append(f"loss_agg must be one of {losses.LOSS_AGG_MODES}, got {loss_agg!r}")
        if update not in UPDATE_MODES:
            errors.append(f"update must be one of {UPDATE_MODES}, got {update!r}")
        if normalize_over not in NORMALIZE_OVER:
            errors.append(f"normalize_over must be one of {NORMALIZE_OVER}, got {normalize_over!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            errors.append(
                f"max_grad_norm must be > 0 (a gradient norm) or null (no clipping), got {max_grad_norm}"
            )
        if max_rollouts is not None and max_rollouts < 1:
            errors.append(f"max_rollouts must be >= 1 (rollouts) or null, got {max_rollouts}")
        if lr_schedule not in ("linear", "constant"):
            errors.append(f"lr_schedule must be linear or constant, got {lr_schedule!r}")
        if ppo_epochs < 1 or ppo_mini_batches < 1:
            errors.append("ppo_epochs and ppo_mini_batches must be >= 1")
        if max_nonfinite_steps < 1:
            errors.append(f"max_nonfinite_steps must be >= 1 (optimizer steps), got {max_nonfinite_steps}")
        if parity_check not in PARITY_CHECKS:
            errors.append(f"parity_check must be one of {PARITY_CHECKS}, got {parity_check!r}")
        if parity_threshold is not None and not parity_threshold > 0:
            errors.append(f"parity_threshold must be > 0 (nats per token) or null, got {parity_threshold}")
        if logprob_chunk_tokens is not None and logprob_chunk_tokens < 0:
            errors.append(
                f"logprob_chunk_tokens must be >= 1 (tokens per LM-head chunk), or 0 / null (unchunked), "
                f"got {logprob_chunk_tokens}"
            )
        if tis_cap is not None and not tis_cap > 0:
            errors.append(f"tis_cap must be > 0 (a ratio cap, e.g. 2.0) or null (no TIS), got {tis_cap}")
        if errors:
            raise ConfigError("model configuration: " + "; ".join(errors))
        if lora is not None:
            lora_config(lora)  # a bad adapter spec fails here, before any model is loaded
        check_model_name(model)  # unknown alias / missing path: fail before anything is loaded
        self.model_name = model
        self.lr = lr
        self.kl_coef = kl_coef
        self.scale_rewards = scale_rewards
        # not self.hparams.update: hparams is a dict, and .update is dict.update (a bound method, never "dash")
        self.update_mode = update
        self.seed = seed
        self.automatic_optimization = False
        self.policy: torch.nn.Module | None = None
        self.reference: torch.nn.Module | None = None
        self.skipped_steps = 0
        self.nonfinite_steps = 0  # optimizer steps skipped for a NaN / infinite loss or gradient
        self.nonfinite_in_a_row = 0
        self.last_rollout: Rollout | None = None
        self.update_stats: list[dict[str, float]] = []  # per optimizer step of the last rollout
        self.phase_seconds: dict[str, float] = {}
        self._val_records: dict[str, list[dict]] = {}
        self._predictions: list[dict] = []
        self._resolved: str | None = None
        self.last_engine_gap: dict[str, float] | None = None  # the last step's parity figures
        self._parity_warned_at = 0.0  # the largest gap warned about so far (warn mode)
        self._gap_trend = GapTrend()  # a gap rising step after step, under the level threshold
        self._trend_warned = False

    # ---- models -------------------------------------------------------------------------------------

    def model_path(self) -> str:
        if self._resolved is None:
            self._resolved = resolve_model(self.model_name, self.hparams.model_cache)
        return self._resolved

    def configure_model(self) -> None:
        if self.policy is not None:
            return
        self.policy = AutoModelForCausalLM.from_pretrained(self.model_path(), dtype=torch.float32)
        if self.hparams.gradient_checkpointing:
            self.policy.gradient_checkpointing_enable()
        self.policy.config.use_cache = False
        if self.hparams.lora is not None:
            self._configure_lora()
        elif self.kl_coef > 0:
            self.reference = AutoModelForCausalLM.from_pretrained(self.model_path(), dtype=torch.float32)
            self.reference.requires_grad_(False).eval()

    def _configure_lora(self) -> None:
        """Wrap the policy in peft's LoRA; the frozen base doubles as the KL reference."""
        if self.hparams.gradient_checkpointing:  # frozen embeddings: checkpointed blocks need a grad input
            self.policy.enable_input_require_grads()
        self.policy = apply_lora(self.policy, self.hparams.lora)
        trainable = parameter_bytes(self.policy, trainable=True)
        frozen = parameter_bytes(self.policy, trainable=False)
        saved = f"; reference = base with adapters disabled, {frozen / 2**20:.0f} MiB not loaded twice"
        rank_zero_info(
            f"[lit_dash] LoRA: {trainable / 2**20:.1f} MiB of adapters train, {frozen / 2**20:.0f} MiB of "
            f"base frozen{saved if self.kl_coef > 0 else ''}"
        )

    @property
    def lora(self) -> bool:
        """Whether the policy trains LoRA adapters (model.lora set)."""
        return is_lora(self.policy)

    @contextlib.contextmanager
    def _reference_model(self):
        """The KL reference: the frozen copy, or under LoRA the policy with its adapters disabled."""
        if self.lora:
            with self.policy.disable_adapter():
                yield self.policy
        else:
            yield self.reference

    def policy_for_export(self) -> torch.nn.Module:
        """The policy as a plain transformers model: itself, or under LoRA a merged copy (the trainer's
        model stays unmerged). lit_dash.lora.merged_state_dict gives the merged weights alone."""
        if self.lora:
            from lit_dash.lora import merged_model

            return merged_model(self.policy)
        return self.policy

    def _autocast(self):
        dtype = resolve_dtype(self.hparams.precision, self.device)
        if dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)

    # ---- the budget, in rollouts ----------------------------------------------------------------------

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps every rollout takes (skipped ones included): 1, ppo_epochs or ppo_mini_batches."""
        hp = self.hparams
        return {"dash": 1, "multi": hp.ppo_epochs, "mini": hp.ppo_mini_batches}[self.update_mode]

    @property
    def rollout_slices(self) -> int:
        """Slices the rollout buffer cuts the kept completions into: one per optimizer step in mini mode."""
        return self.hparams.ppo_mini_batches if self.update_mode == "mini" else 1

    @property
    def rollouts_done(self) -> int:
        """Rollouts (prompt batches) trained on so far: every rollout takes exactly steps_per_rollout steps."""
        return self.global_step // self.steps_per_rollout

    def apply_rollout_budget(self) -> None:
        """``max_rollouts`` becomes the trainer's ``max_steps`` (max_rollouts x steps_per_rollout), so fit
        stops, and a resumed fit knows where it stands, in Lightning's own terms. RolloutDataModule.setup
        calls this before the engine starts; ``setup`` again for other datamodules."""
        budget = self.hparams.max_rollouts
        if budget is None or self._trainer is None:
            return
        steps = budget * self.steps_per_rollout
        if self.trainer.max_steps not in (-1, steps):
            raise ConfigError(
                f"model.max_rollouts={budget} (= {steps} optimizer steps with update={self.update_mode}) and "
                f"trainer.max_steps={self.trainer.max_steps} are two budgets that disagree: set one "
                "(trainer.max_steps: -1 lets max_rollouts decide)"
            )
        self.trainer.fit_loop.epoch_loop.max_steps = steps

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.apply_rollout_budget()
            if self.hparams.max_grad_norm is not None and isinstance(
                self.trainer.strategy, DeepSpeedStrategy
            ):
                raise ConfigError(
                    f"model.max_grad_norm={self.hparams.max_grad_norm} cannot clip under DeepSpeed: ZeRO keeps "
                    "the gradients in its own partitions and clips them itself (its gradient_clipping setting); "
                    "set model.max_grad_norm: null"
                )

    # ---- the reward hook ----------------------------------------------------------------------------

    def reward(self, completions: list[str], problems: list[Problem]) -> Sequence[float]:
        """Score each completion (one float each). Override in a subclass for a new reward.

        ``problems[i]`` is the problem completion i answers (reference in ``.answer``, extra columns in
        ``.extra``). The default is 1.0 when the last ``\\boxed{}`` is equivalent to the reference and in
        final form (``model.require_final_form``).
        """
        return math_rewards(
            completions,
            [p.answer for p in problems],
            last_number_fallback=self.hparams.answer_fallback,
            require_final_form=self.hparams.require_final_form,
        )

    # ---- optimisation -------------------------------------------------------------------------------

    def configure_optimizers(self):
        params = [p for p in self.policy.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=self.hparams.weight_decay)
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else None
        if self.hparams.max_rollouts is not None:  # the budget in rollouts, in optimizer steps
            total = self.hparams.max_rollouts * self.steps_per_rollout
        warmup = self.hparams.warmup_steps
        linear = self.hparams.lr_schedule == "linear" and total is not None

        def factor(step: int) -> float:
            if warmup and step < warmup:
                return (step + 1) / warmup
            if linear:
                return max(0.0, 1.0 - (step - warmup) / max(1, total - warmup))
            return 1.0

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def completion_hidden(self, model: torch.nn.Module, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states at completion positions only, ``[N, H]`` for the N completion tokens (the
        state that predicts each), and their targets ``[N]``."""
        ids = mb.input_ids.to(self.device)
        with self._autocast():
            hidden = model.get_decoder()(input_ids=ids, attention_mask=mb.attention_mask.to(self.device))
        positions = mb.completion_mask.to(self.device) > 0
        return hidden.last_hidden_state[:, :-1][positions], ids[:, 1:][positions]

    def completion_logits(self, model: torch.nn.Module, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at completion positions only, ``[N, V]`` for the N completion tokens, and their targets.

        The vocabulary projection and log-softmax dominate a small model's step (49k vocab); prompt
        positions never need them, so the LM head runs on the N completion positions alone.
        """
        hidden, targets = self.completion_hidden(model, mb)
        with self._autocast():
            return model.get_output_embeddings()(hidden), targets

    def completion_logprobs(
        self, model: torch.nn.Module, mb: MicroBatch, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``model``'s log-probs of the N completion tokens at the sampling temperature, ``[N]``, and with
        ``with_entropy`` their entropies (detached). With ``logprob_chunk_tokens`` the LM head and the
        log-softmax run on that many tokens at a time (recomputed in backward), so no ``[N, V]`` logits
        are kept; null / 0 computes (and autograd keeps) the full ``[N, V]`` logits."""
        temperature = mb.temperature
        chunk = self.hparams.logprob_chunk_tokens
        if not chunk:
            logits, targets = self.completion_logits(model, mb)
            logprobs = losses.token_logprobs(logits[None], targets[None], temperature=temperature)[0]
            entropy = None
            if with_entropy:
                with torch.no_grad():
                    entropy = losses.entropy_from_logits(logits.detach()[None], temperature=temperature)[0]
            return logprobs, entropy
        hidden, targets = self.completion_hidden(model, mb)
        lm_head = model.get_output_embeddings()

        def head(h: torch.Tensor) -> torch.Tensor:
            with self._autocast():  # re-entered when the checkpoint recomputes the chunk in backward
                return lm_head(h)

        return losses.chunked_logprobs_and_entropy(hidden, head, targets, chunk, temperature, with_entropy)

    def _scatter(self, values: torch.Tensor, mb: MicroBatch) -> torch.Tensor:
        out = values.new_zeros(mb.completion_mask.shape, device=self.device)
        out[mb.completion_mask.to(self.device) > 0] = values
        return out

    def forward(self, micro_batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs and entropies at the sampling temperature (``logits / T``), ``[b, L-1]``,
        zero outside the completion positions."""
        logprobs, entropy = self.completion_logprobs(self.policy, micro_batch, with_entropy=True)
        return self._scatter(logprobs, micro_batch), self._scatter(entropy, micro_batch)

    @torch.no_grad()
    def _logprobs_of(self, model: torch.nn.Module, mb: MicroBatch) -> torch.Tensor:
        """``model``'s log-probs of the completion tokens at the sampling temperature (policy for PPO's
        old log-probs, reference for the KL)."""
        return self._scatter(self.completion_logprobs(model, mb)[0], mb)

    def _add_time(self, phase: str, seconds: float) -> None:
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + seconds

    def step_counts(self, micro_batches: list[MicroBatch], max_new_tokens: int) -> dict[str, float]:
        """Step-wide denominators, so the loss does not depend on how the step is split into micro-batches."""
        counts = [losses.global_loss_counts(mb.completion_mask) for mb in micro_batches]
        seqs = float(sum(float(n_seqs) for _, n_seqs in counts))
        return {
            "global_tokens": float(sum(float(n_tokens) for n_tokens, _ in counts)),
            "global_seqs": seqs,
            "normalizer": seqs * max_new_tokens,
        }

    def normalizer_weight(self, counts: dict[str, float], sampled: tuple[float, float] | None) -> float:
        """The factor that turns a loss normalised by the kept ``counts`` (:meth:`step_counts`) into one
        normalised over the completions sampled before filtering, ``sampled`` = (completions, tokens) of
        this step (or of its share of the rollout): kept denominator / sampled denominator. 1 with
        ``normalize_over: kept`` or without ``sampled``. The logged entropy, KL and clip fraction stay
        means over the kept tokens."""
        if self.hparams.normalize_over == "kept" or sampled is None:
            return 1.0
        seqs, tokens = sampled
        token_mean = self.hparams.loss_agg == "token_mean"
        kept, total = (counts["global_tokens"], tokens) if token_mean else (counts["global_seqs"], seqs)
        return kept / total if total > 0 else 1.0

    def micro_batch_loss(
        self,
        mb: MicroBatch,
        counts: dict[str, float],
        old_logprobs: torch.Tensor | None = None,
        ref_logprobs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share of the step loss (summing over the step's micro-batches gives the step
        loss), and its share of the logged statistics.

        On-policy (``old_logprobs`` None) this forward is the step's first, so it also measures the gap to
        the engine's log-probs (``gap_sum``, ``gap_max``, ``gap_tokens`` in the stats; PPO measures it on
        the old log-probs instead). With ``tis_cap`` each token's policy-gradient term is weighted by
        ``min(exp(old - engine), tis_cap)``, the old log-probs being the current ones on-policy.
        """
        hp = self.hparams
        mask = mb.completion_mask.to(self.device)
        logprobs, entropy = self(mb)
        per_token, clip_frac = losses.policy_loss(
            logprobs, old_logprobs, mb.advantages.to(self.device), mask, hp.clip_eps_low, hp.clip_eps_high
        )
        share = float(mask.sum()) / max(counts["global_tokens"], 1.0)
        stats = {
            "clip_fraction": float(clip_frac) * share,
            "entropy": float((entropy * mask).sum()) / max(counts["global_tokens"], 1.0),
            "kl": 0.0,
        }
        engine_lp = mb.engine_logprobs.to(self.device) if mb.engine_logprobs is not None else None
        if old_logprobs is None and engine_lp is not None:
            gap_sum, gap_max, gap_tokens = losses.logprob_gap(logprobs, engine_lp, mask)
            stats.update(gap_sum=float(gap_sum), gap_max=float(gap_max), gap_tokens=float(gap_tokens))
        if hp.tis_cap is not None:
            if engine_lp is None:
                raise RunStopped(
                    "model.tis_cap needs the engine's log-probs of the sampled tokens, and this rollout has "
                    "none (the engine reported no log-probs): use the vllm or hf engine, or set tis_cap: null"
                )
            old = old_logprobs if old_logprobs is not None else logprobs.detach()
            weights = losses.truncated_importance_weights(old, engine_lp, hp.tis_cap)
            per_token = per_token * weights
            stats["tis_weight_mean"] = float((weights * mask).sum()) / max(counts["global_tokens"], 1.0)
        if self.kl_coef > 0:
            kl = losses.kl_penalty(logprobs, ref_logprobs, hp.kl_estimator)
            per_token = per_token + self.kl_coef * kl
            stats["kl"] = float((kl.detach() * mask).sum()) / max(counts["global_tokens"], 1.0)
        loss = losses.aggregate_loss(per_token, mask, hp.loss_agg, **counts)
        stats["loss"] = float(loss.detach())
        return loss, stats

    def _accumulate(
        self,
        micro_batches: list[MicroBatch],
        chunk: list[int],
        old: dict | None,
        ref: dict,
        sampled: tuple[float, float] | None = None,
    ) -> dict[str, float]:
        """Forward + backward over the micro-batches ``chunk`` names, normalised by the counts of all of
        them together, on all ranks together.

        Under DDP every rank must make the same backward calls (each syncing one is an all-reduce), yet
        filtering leaves each rank its own number of micro-batches. So ``chunk`` counts the most any rank
        kept; an index past this rank's micro-batches is a zero loss. Only the chunk's last backward syncs
        (``no_sync`` before it). The loss is normalised by the counts of all ranks and scaled by the world
        size, so DDP's gradient mean makes the step of the whole world's rollout, split or not.
        ``sampled`` (this rank's sampled completions and tokens behind the chunk, summed over ranks here
        too) is what ``normalize_over: rollout`` divides by instead (:meth:`normalizer_weight`).
        """
        real = [i for i in chunk if i < len(micro_batches)]
        counts = self.step_counts(
            [micro_batches[i] for i in real], self.trainer.datamodule.sampling.max_new_tokens
        )
        values = self._reduce_over_ranks([*counts.values(), *(sampled or ())], "sum")
        counts = dict(zip(counts, values[: len(counts)], strict=True))
        sampled = tuple(values[len(counts) :]) if sampled else None
        weight = self.normalizer_weight(counts, sampled)
        world = self.trainer.world_size
        totals = self._zero_totals()
        # the completions the loss is divided over (x max_new_tokens in constant mode)
        over_rollout = sampled is not None and self.hparams.normalize_over == "rollout"
        totals["loss_denominator_completions"] = sampled[0] if over_rollout else counts["global_seqs"]
        for n, i in enumerate(chunk):
            with self._grad_sync(last=n == len(chunk) - 1):
                if i < len(micro_batches):
                    old_i = old[i] if old is not None else None
                    loss, stats = self.micro_batch_loss(micro_batches[i], counts, old_i, ref.get(i))
                    loss, stats["loss"] = loss * weight, stats["loss"] * weight
                    for key, value in stats.items():
                        if key == "gap_max":
                            totals[key] = max(totals.get(key, 0.0), value)
                        else:
                            totals[key] = totals.get(key, 0.0) + value
                else:
                    loss = self._zero_loss()
                self.manual_backward(loss * world if world > 1 else loss)
        return totals

    def _zero_totals(self) -> dict[str, float]:
        """A step's logged sums before any micro-batch adds to them (the same keys whether it trains or not)."""
        totals = {"loss": 0.0, "kl": 0.0, "clip_fraction": 0.0, "entropy": 0.0}
        if self.hparams.tis_cap is not None:
            totals["tis_weight_mean"] = 0.0
        return totals

    def _reduce_over_ranks(self, values: list[float], op: str) -> list[float]:
        """Sum or max of each value over all ranks, through the strategy (a no-op on one process)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return values
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        return self.trainer.strategy.reduce(tensor, reduce_op=op).tolist()

    def _grad_sync(self, last: bool):
        """DDP's ``no_sync`` for every backward but the last of an optimizer step: one all-reduce per step."""
        model = self.trainer.strategy.model
        if last or self.trainer.world_size == 1 or not isinstance(model, DistributedDataParallel):
            return contextlib.nullcontext()
        return model.no_sync()

    def _zero_loss(self) -> torch.Tensor:
        """Exactly 0, yet through a forward of every policy parameter, so its backward reaches them all
        (what DDP's all-reduce waits for) and adds nothing to any gradient."""
        ids = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        with self._autocast():
            logits = self.policy(input_ids=ids).logits
        return logits.float().sum() * 0.0

    def _optimizer_step(self, loss: float = 0.0) -> float:
        """Clip and step; a non-finite loss or gradient norm skips the update (the grads are dropped)."""
        optimizer = self.optimizers()
        start = time.perf_counter()
        grad_norm = self._clip_gradients(optimizer)
        nonfinite = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if self.trainer.strategy.reduce_boolean_decision(nonfinite, all=False):  # every rank skips together
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without a gradient untouched
            self._count_nonfinite(loss, grad_norm)
        else:
            self.nonfinite_in_a_row = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.lr_schedulers().step()
        self._add_time("optimizer", time.perf_counter() - start)
        return grad_norm

    def _clip_gradients(self, optimizer) -> float:
        """Clip to ``max_grad_norm`` by the norm of the whole model's gradient, all ranks' shards together,
        and return that norm before clipping (logged as train/grad_norm).

        DDP / one process: every rank holds the full (all-reduced) gradient, so the local norm is the
        global one; Lightning clips (``clip_gradients``: the precision plugin; DTensor gradients under
        ModelParallelStrategy reduce their norm over the mesh). FSDP: each rank holds a shard of each
        gradient, torch's clip would scale every rank by its own shard's norm, and Lightning's Trainer
        refuses norm clipping there; the root FSDP module's ``clip_grad_norm_`` all-reduces the norm.
        """
        max_norm = self.hparams.max_grad_norm
        root = self.trainer.strategy.model
        if isinstance(root, FullyShardedDataParallel):
            return float(root.clip_grad_norm_(max_norm if max_norm is not None else math.inf))
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.zeros(())
        if isinstance(norm, DTensor):
            norm = norm.full_tensor()
        if max_norm is not None:
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")
        return float(norm)

    def _count_nonfinite(self, loss: float, grad_norm: float) -> None:
        self.nonfinite_steps += 1
        self.nonfinite_in_a_row += 1
        where = f"step {self.global_step}: loss {loss}, grad norm {grad_norm}"
        if self.nonfinite_in_a_row >= self.hparams.max_nonfinite_steps:
            raise NonFiniteLossError(
                f"stopping: {self.nonfinite_in_a_row} optimizer steps in a row had a NaN or infinite loss or "
                f"gradient (last at {where}; model.max_nonfinite_steps={self.hparams.max_nonfinite_steps}). "
                "None of them changed the weights, so the last checkpoint holds the last good ones. "
                "Try a lower model.lr, a model.max_grad_norm, model.precision: float32, or check the reward."
            )
        rank_zero_warn(
            f"{where} is not finite; skipped this update "
            f"({self.nonfinite_in_a_row} in a row, the run stops at {self.hparams.max_nonfinite_steps})"
        )

    def training_step(self, problems: list[Problem], batch_idx: int) -> None:
        self.phase_seconds = {}
        rollout = self.trainer.datamodule.rollout(problems, self.reward)
        self.last_rollout = rollout
        for phase, seconds in rollout.timings.items():
            self._add_time(phase, seconds)
        stats = {f"train/{k}": v for k, v in rollout.stats().items()}
        stats["train/accuracy"] = float((rollout.rewards >= 1.0).float().mean())

        # per slice, the most micro-batches any rank kept: every rank runs that many backward calls
        slice_sizes = list(rollout.slice_sizes)
        most = [int(n) for n in self._reduce_over_ranks(slice_sizes, "max")]
        first_step = self.global_step
        self.update_stats = []
        if sum(most) == 0:
            # Nothing informative survived filtering on any rank: counted no-op steps, as many as a rollout
            # takes. All grads are None, so AdamW leaves every weight untouched; stepping keeps Lightning's
            # step count (and the budget in rollouts) honest and advances the LR schedule.
            for n in range(self.steps_per_rollout):
                self.skipped_steps += 1
                if n == 0:  # the guard watches steps that train on nothing too, before any update
                    stats.update(self._check_parity(*self._probe_gap(rollout), rollout))
                self.optimizers().zero_grad(set_to_none=True)
                self._optimizer_step()
            stats["train/optimizer_steps_per_rollout"] = float(self.global_step - first_step)
            self._log_step(stats, self._zero_totals(), float("nan"))
            return

        start = time.perf_counter()
        ref = {}
        if self.kl_coef > 0:
            with self._reference_model() as reference:
                ref = {i: self._logprobs_of(reference, mb) for i, mb in enumerate(rollout.micro_batches)}
        old = None
        gap = None
        if self.update_mode != "dash":  # PPO: the ratio is taken against the sampling-time policy
            old = {i: self._logprobs_of(self.policy, mb) for i, mb in enumerate(rollout.micro_batches)}
            gap = self._gap_sums(
                [
                    losses.logprob_gap(
                        old[i], mb.engine_logprobs.to(self.device), mb.completion_mask.to(self.device)
                    )
                    for i, mb in enumerate(rollout.micro_batches)
                    if mb.engine_logprobs is not None
                ]
            )
        self._add_time("ref_old_logprobs", time.perf_counter() - start)

        plan = self._update_plan(slice_sizes, most)
        share = 1.0 / len(plan) if self.update_mode == "mini" else 1.0  # of the sampled completions
        # skipped prompts (data.prompt_skipping) count as G zero-advantage completions each
        sampled = (rollout.counted_completions * share, rollout.counted_tokens * share)
        totals = self._zero_totals()
        grad_norm = float("nan")
        checked = False  # the parity guard runs on the first step that trains, before its update
        for chunk in plan:
            if not chunk:  # a mini-batch slice with nothing kept on any rank: a counted no-op step
                self.skipped_steps += 1
                self._optimizer_step()
                self.update_stats.append({"loss": 0.0, "skipped": 1.0})
                continue
            start = time.perf_counter()
            totals = self._accumulate(rollout.micro_batches, chunk, old, ref, sampled)
            on_policy_gap = tuple(totals.pop(k, 0.0) for k in ("gap_sum", "gap_max", "gap_tokens"))
            self._add_time("forward_backward", time.perf_counter() - start)
            if not checked:  # before the first update: stop here, not after training on a mismatched rollout
                checked = True
                if gap is None:
                    gap = on_policy_gap
                stats.update(self._check_parity(*gap, rollout))
            grad_norm = self._optimizer_step(totals["loss"])
            self.update_stats.append({**totals, "grad_norm": grad_norm})
        stats["train/optimizer_steps_per_rollout"] = float(self.global_step - first_step)
        self._log_step(stats, totals, grad_norm)

    def _probe_gap(self, rollout: Rollout) -> tuple[float, float, float]:
        """The parity gap of a step that kept nothing, on the rollout's probe micro-batch of dropped
        completions: one forward without backward, so the guard also watches steps that train on nothing
        (a stale engine's samples may be exactly the ones filtering drops)."""
        probe = rollout.parity_probe
        if probe is None or probe.engine_logprobs is None:
            return 0.0, 0.0, 0.0
        start = time.perf_counter()
        logprobs = self._logprobs_of(self.policy, probe)
        mask = probe.completion_mask.to(self.device)
        gap = self._gap_sums([losses.logprob_gap(logprobs, probe.engine_logprobs.to(self.device), mask)])
        self._add_time("ref_old_logprobs", time.perf_counter() - start)
        return gap

    @staticmethod
    def _gap_sums(parts: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> tuple[float, float, float]:
        """Combine per-micro-batch (sum, max, tokens) of the log-prob gap."""
        return (
            float(sum(float(s) for s, _, _ in parts)),
            max((float(m) for _, m, _ in parts), default=0.0),
            float(sum(float(t) for _, _, t in parts)),
        )

    def parity_threshold(self, rollout: Rollout | None = None) -> float:
        """model.parity_threshold, or the default for this trainer precision, the engine's dtype and the
        rollout's sampling (truncated by top-k / top-p or not)."""
        if self.hparams.parity_threshold is not None:
            return float(self.hparams.parity_threshold)
        engine = getattr(getattr(self.trainer, "datamodule", None), "engine", None) if self._trainer else None
        return default_parity_threshold(
            resolve_dtype(self.hparams.precision, self.device),
            getattr(engine, "dtype", None),
            truncated=rollout is not None and rollout.truncated_sampling,
        )

    def _check_parity(self, gap_sum: float, gap_max: float, gap_tokens: float, rollout: Rollout) -> dict:
        """The step's engine/trainer log-prob gap over all ranks (logged), and the guard on it."""
        gap_sum, gap_tokens = self._reduce_over_ranks([gap_sum, gap_tokens], "sum")
        (gap_max,) = self._reduce_over_ranks([gap_max], "max")
        if gap_tokens == 0:  # the engine reported no log-probs: nothing to compare
            self.last_engine_gap = None
            return {}
        mean = gap_sum / gap_tokens
        self.last_engine_gap = {"mean": mean, "max": gap_max, "tokens": gap_tokens}
        figures = {"train/engine_logprob_gap": mean, "train/engine_logprob_gap_max": gap_max}
        check = self.hparams.parity_check
        threshold = self.parity_threshold(rollout)
        self._gap_trend.floor = threshold / 10  # fp32 noise doubling from 1e-7 is no trend
        trend = self._gap_trend.update(mean)
        if check != "off" and trend is not None and mean <= threshold:
            message = (
                f"step {self.global_step}: {trend}. Pin model.precision and data.engine.dtype to the same "
                "dtype to tell the two apart; model.parity_check: off silences this"
            )
            if check == "error":
                raise EngineParityError(message)
            if not self._trend_warned:
                self._trend_warned = True
                rank_zero_warn(message + " (model.parity_check: warn; warned once)")
        if check == "off" or mean <= threshold:
            return figures
        message = self._parity_message(mean, gap_max, gap_tokens, threshold, rollout)
        if check == "error":
            raise EngineParityError(message)
        if mean > 2 * self._parity_warned_at:  # warn again only when the gap has doubled since the last one
            self._parity_warned_at = mean
            rank_zero_warn(message + " (model.parity_check: warn; warns again if the gap doubles)")
        return figures

    def _parity_message(
        self, mean: float, gap_max: float, tokens: float, threshold: float, rollout: Rollout
    ) -> str:
        engine = getattr(self.trainer.datamodule, "engine", None) if self._trainer else None
        engine_dtype = str(getattr(engine, "dtype", "unknown")).removeprefix("torch.")
        precision = str(resolve_dtype(self.hparams.precision, self.device)).removeprefix("torch.")
        truncation = ""
        if rollout.truncated_sampling:
            truncation = (
                f"; top-k / top-p truncation (top_k={rollout.top_k}, top_p={rollout.top_p}): the engine "
                "renormalises over the kept tokens, the trainer does not, so the removed mass counts in the gap"
            )
        chosen = (
            "model.parity_threshold"
            if self.hparams.parity_threshold is not None
            else "default for this precision and sampling"
        )
        return (
            f"step {self.global_step}: the engine's log-probs of its own samples differ from the policy's by "
            f"{mean:.4f} nats per token on average (max {gap_max:.3f}, over {int(tokens)} tokens), above the "
            f"threshold {threshold} ({chosen}): the engine is not sampling from the policy being trained. "
            "Likely causes: the engine is not serving the policy's weights (a weight sync skipped or not "
            "taking effect; see time/weight_sync); the trainer's temperature is not the sampling temperature "
            f"(the rollout says {rollout.temperature}); a precision mismatch (trainer {precision}, engine "
            f"{engine_dtype}: pin model.precision and data.engine.dtype to float32 to tell){truncation}. "
            "To change the check: model.parity_check (warn / error / off) and model.parity_threshold; "
            "model.tis_cap corrects a small, expected mismatch."
        )

    def _update_plan(self, slice_sizes: list[int], most: list[int] | None = None) -> list[list[int]]:
        """Which micro-batches each optimizer step of this rollout accumulates over.

        ``slice_sizes``: this rank's micro-batches per slice, in order (one slice, unless update=mini cut
        one per step); ``most``: the most any rank has per slice (default: these). A slice's step runs
        ``most`` backward calls on every rank; an index past this rank's micro-batches is a zero loss.
        An empty slice (nothing kept on any rank) is an empty step.
        """
        most = list(slice_sizes) if most is None else list(most)
        chunks, start, pad = [], 0, sum(slice_sizes)
        for local, width in zip(slice_sizes, most, strict=True):
            chunks.append(list(range(start, start + local)) + list(range(pad, pad + width - local)))
            start, pad = start + local, pad + width - local
        if self.update_mode == "multi":
            return chunks * self.hparams.ppo_epochs
        return chunks

    def _log_step(self, stats: dict[str, float], totals: dict[str, float], grad_norm: float) -> None:
        """Log the step's scalars as the world's (every rank's rollout, see :mod:`lit_dash.world_metrics`),
        not rank 0's: every rank computes the same values, rank 0's logger writes them."""
        metrics = dict(stats)
        metrics.update({f"train/{k}": v for k, v in totals.items()})
        metrics["train/grad_norm"] = grad_norm
        metrics["train/lr"] = self.lr_schedulers().get_last_lr()[0]
        metrics["train/skipped_steps"] = float(self.skipped_steps)
        metrics["train/nonfinite_steps"] = float(self.nonfinite_steps)
        metrics["train/skipped_long_prompts"] = float(
            getattr(self.trainer.datamodule, "skipped_long_prompts", 0)
        )
        history = getattr(self.trainer.datamodule, "skip_history", None)  # the world's, on every rank
        metrics["train/skipped_prompts_total"] = float(history.skipped_prompts_total if history else 0)
        metrics["train/skipped_completions_total"] = metrics["train/skipped_prompts_total"] * float(
            self.last_rollout.group_size
        )
        if history is not None:  # does "uniform before" predict "uniform again"? (data.skipping)
            metrics["train/predicted_uniform_sampled_total"] = float(history.predicted_uniform_sampled)
            if history.predicted_uniform_sampled:  # the same on every rank: every rank logs it or none
                metrics["train/predicted_uniform_confirmed_fraction"] = history.confirmed_fraction
        metrics = world_values(metrics, self._rollout_weights(self.last_rollout), self.device)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        self.log("reward", metrics["train/reward_mean"], prog_bar=True, logger=False, batch_size=1)
        self.log("kept", metrics["train/kept_fraction"], prog_bar=True, logger=False, batch_size=1)

    @staticmethod
    def _rollout_weights(rollout: Rollout) -> dict[str, float]:
        """What this rank's rollout ratios are fractions or means of (the weights of their world means)."""
        completions = len(rollout.completions)
        return {
            "completions": float(completions),
            "kept": float(rollout.num_kept),
            "groups": completions / rollout.group_size,
            "padded_tokens": float(sum(mb.input_ids.numel() for mb in rollout.micro_batches)),
        }

    # ---- validation, test and predict (lit-dash validate / test / predict) ---------------------------

    def validation_step(self, problems: list[Problem], batch_idx: int, dataloader_idx: int = 0) -> None:
        dm = self.trainer.datamodule
        name = list(dm.evaluators)[dataloader_idx]
        records = dm.evaluators[name].score_batch(dm.engine, problems, self.reward)
        self._val_records.setdefault(name, []).extend(records)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_epoch(tag="validate", prefix="eval")

    def _log_eval_epoch(self, tag: str, prefix: str) -> None:
        # each rank scored its own share of every set (the dataloader's unrepeated sampler); gathered,
        # every rank holds the whole set once and logs the same values
        records = {name: self._gather_shares(self._val_records.get(name, [])) for name in self._val_sets()}
        records = {name: rs for name, rs in records.items() if rs}  # a set no batch of which ran
        results = self.collect_eval_results(records, tag=tag)
        for result in results:
            for key, value in result.metrics(prefix).items():
                # equal on every rank: max is an exact no-op reduction (and keeps Lightning from warning)
                self.log(key, value, add_dataloader_idx=False, batch_size=1, sync_dist=True, reduce_fx="max")
        self._val_records = {}

    def _val_sets(self) -> list[str]:
        return list(self.trainer.datamodule.evaluators)

    def _gather_shares(self, records: list[dict]) -> list[dict]:
        """Every rank's share of an eval set's records (see :func:`lit_dash.evaluation.shard`), merged
        back into the set's order; on one process, ``records`` itself."""
        if self._trainer is None or self.trainer.world_size == 1:
            return records
        shares: list[list[dict]] = [[] for _ in range(self.trainer.world_size)]
        torch.distributed.all_gather_object(shares, records)  # text records: an object gather
        return unshard(shares)

    def test_step(self, problems: list[Problem], batch_idx: int, dataloader_idx: int = 0) -> None:
        """``lit-dash test``: the eval sets, scored as in validation, logged as ``test/<set>/...``."""
        self.validation_step(problems, batch_idx, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._log_eval_epoch(tag="test", prefix="test")

    def predict_step(self, problems: list[Problem], batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """``lit-dash predict``: one greedy completion per prompt of ``data.predict_file`` (the eval
        sampling: temperature 0, ``eval_max_new_tokens``); problems with an ``answer`` are scored too."""
        from lit_dash.data.formatting import format_prompts
        from lit_dash.engines.base import SamplingConfig
        from lit_dash.rewards import extract_answer

        dm = self.trainer.datamodule
        prompts = format_prompts(
            problems, dm.engine.tokenizer, style=dm.prompt_style, instruction=dm.instruction
        )
        sampling = SamplingConfig(temperature=0.0, max_new_tokens=dm.eval_max_new_tokens)
        result = dm.engine.generate(prompts, 1, sampling)
        records = [
            {
                "source_id": p.source_id,
                "question": p.question,
                "prompt": prompt,
                "completion": c.text,
                "extracted": extract_answer(c.text, self.hparams.answer_fallback),
                "completion_tokens": len(c.token_ids),
                "truncated": c.truncated,
            }
            for p, prompt, c in zip(problems, prompts, result.completions, strict=True)
        ]
        scored = [i for i, p in enumerate(problems) if p.answer]
        if scored:
            rewards = self.reward([records[i]["completion"] for i in scored], [problems[i] for i in scored])
            for i, reward in zip(scored, rewards, strict=True):
                records[i].update(reference=problems[i].answer, reward=float(reward))
        self._predictions.extend(records)
        return records

    def on_predict_epoch_end(self) -> None:
        from lightning.pytorch.utilities import rank_zero_info

        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        if self.trainer.is_global_zero:
            path = write_jsonl(self._predictions, f"{log_dir}/predictions.jsonl")
            rank_zero_info(f"[lit_dash] {len(self._predictions)} completions written to {path}")
        self._predictions = []

    def collect_eval_results(self, records_by_set: dict[str, list[dict]], tag: str) -> list[EvalResult]:
        """Summarise evaluation records (each set whole, every rank's share gathered) and write them as
        JSONL next to the logs (rank 0)."""
        results = []
        log_dir = self.trainer.log_dir if self.trainer is not None and self.trainer.log_dir else "."
        for name, records in records_by_set.items():
            if self.trainer is None or self.trainer.is_global_zero:  # ranks share the file name
                write_jsonl(records, f"{log_dir}/eval/{name}_{tag}_step{self.global_step}.jsonl")
            results.append(summarize(name, records))
        return results

    def configure_callbacks(self):
        """Weight sync is not optional: without it the engine keeps sampling from the initial weights."""
        from lit_dash.callbacks.weight_sync import WeightSync

        if any(isinstance(c, WeightSync) for c in self.trainer.callbacks):
            return []
        return [WeightSync()]

    def evaluate(self) -> list[EvalResult]:
        """Greedy evaluation on every eval set of the datamodule (used by the evaluation callback)."""
        from lit_dash.callbacks.weight_sync import WeightSync

        for callback in self.trainer.callbacks:  # whatever the callback order, evaluate the current weights
            if isinstance(callback, WeightSync) and callback.synced_step != self.global_step:
                callback.sync(self.trainer, self)
        dm = self.trainer.datamodule
        rank, world = self.trainer.global_rank, self.trainer.world_size
        records = {  # each rank scores its share of every set, no duplicates; gathered, the whole set once
            name: self._gather_shares(
                evaluator.records(dm.engine, self.reward, shard(evaluator.problems, rank, world))
            )
            for name, evaluator in dm.evaluators.items()
        }
        return self.collect_eval_results(records, tag="fit")

    REFERENCE_PREFIX = "reference."

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lightning saves weights, optimizer, scheduler, step and the datamodule's prompt position;
        # the counters and the RNG states of every rank are ours to add. The frozen reference is the
        # base model, loaded again on resume: a copy of it in every checkpoint would add a model's size.
        state = checkpoint.get("state_dict", {})
        for key in [k for k in state if k.startswith(self.REFERENCE_PREFIX)]:
            del state[key]
        checkpoint["lit_dash"] = {
            "skipped_steps": self.skipped_steps,
            "nonfinite_steps": self.nonfinite_steps,
            "rng": rng_states_by_rank(),
        }
        self._keep_adapters_only(checkpoint)

    def _keep_adapters_only(self, checkpoint: dict) -> None:
        """Under LoRA a checkpoint's weights are the adapters alone (the optimizer already holds only
        theirs); the frozen base comes back from the model on disk (:meth:`_fill_frozen_base`)."""
        if self.lora and "state_dict" in checkpoint:
            from lit_dash.lora import adapter_state

            trainable = {f"policy.{n}" for n, p in self.policy.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = adapter_state(checkpoint["state_dict"], trainable)

    def _fill_frozen_base(self, checkpoint: dict) -> None:
        """An adapter-only checkpoint gets the frozen base's weights (as loaded from disk) back, so
        Lightning's strict load still checks every adapter key."""
        if self.lora and "state_dict" in checkpoint:
            frozen = {k: v for k, v in self.state_dict().items() if k not in checkpoint["state_dict"]}
            checkpoint["state_dict"] = {**frozen, **checkpoint["state_dict"]}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("lit_dash", {})
        self.skipped_steps = state.get("skipped_steps", 0)
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        self._rng_to_restore = state.get("rng")
        self.configure_model()
        if self.reference is not None and "state_dict" in checkpoint:  # the base model's, just loaded
            weights = checkpoint["state_dict"]
            for key, value in self.reference.state_dict().items():
                weights.setdefault(self.REFERENCE_PREFIX + key, value)
        self._fill_frozen_base(checkpoint)

    def on_train_start(self) -> None:
        # Restored here, not on load: between the two, Lightning creates the DataLoader iterator, which
        # draws from torch's generator; the interrupted run had drawn that before its checkpoint.
        if getattr(self, "_rng_to_restore", None) is not None:
            restore_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
