"""The LightningModule: policy (trainable), frozen reference (only when kl_coef > 0), the reward hook,
and one optimizer step per rollout (DASH), or K passes / S mini-batch steps (PPO "multi" / "mini").

Optimisation is manual because the number of micro-batches that survive filtering changes every step.
The loss of a step is normalised by step-wide counts, so it is the same however the kept completions
were split into micro-batches.

The hooks here are thin: the log-probs, the loss, the parity guard, the optimizer and the ranks' plumbing
live in :mod:`lit_dash.training`, one concern a file; what the module and the datamodule ask of each
other is written down in :mod:`lit_dash.contract`.
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
from transformers import AutoModelForCausalLM

from lit_dash import losses
from lit_dash.checkpointing import (
    REFERENCE_PREFIX,
    drop_reference,
    restore_reference,
    restore_rng_states,
    rng_states_by_rank,
    with_frozen_base,
)
from lit_dash.contract import RolloutData
from lit_dash.data.batches import MicroBatch
from lit_dash.data.buffer import Rollout
from lit_dash.data.records import Problem
from lit_dash.engines.base import Engine
from lit_dash.errors import ConfigError
from lit_dash.evaluation import EvalResult, Evaluator, shard, summarize, write_jsonl
from lit_dash.hardware import resolve_dtype
from lit_dash.lora import adapter_state, apply_lora, is_lora, lora_config, merged_model, parameter_bytes
from lit_dash.models import check_model_name, resolve_model
from lit_dash.rewards import math_rewards
from lit_dash.step_metrics import rollout_weights, step_metrics
from lit_dash.training import distributed, policy, update
from lit_dash.training.optim import (
    NonFiniteLossError,
    build_optimizer,
    clip_global_norm,
    nonfinite_warning,
    optim_problems,
)
from lit_dash.training.parity import (
    PARITY_CHECKS,
    PARITY_THRESHOLD_FP32,
    PARITY_THRESHOLD_LOW_PRECISION,
    EngineParityError,
    GapParts,
    ParityGuard,
    default_parity_threshold,
    gap_sums,
    parity_message,
    parity_problems,
)
from lit_dash.training.update import NORMALIZE_OVER, UPDATE_MODES, UpdateSpec
from lit_dash.world_metrics import world_values

# the names lit_dash.module has always exported, now defined in lit_dash.training
__all__ = [
    "NORMALIZE_OVER",
    "PARITY_CHECKS",
    "PARITY_THRESHOLD_FP32",
    "PARITY_THRESHOLD_LOW_PRECISION",
    "UPDATE_MODES",
    "DashModule",
    "EngineParityError",
    "NonFiniteLossError",
    "default_parity_threshold",
]


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
        errors = UpdateSpec.from_hparams(self.hparams).problems()
        errors += optim_problems(max_grad_norm, lr_schedule, max_nonfinite_steps)
        errors += parity_problems(parity_check, parity_threshold)
        if max_rollouts is not None and max_rollouts < 1:
            errors.append(f"max_rollouts must be >= 1 (rollouts) or null, got {max_rollouts}")
        if logprob_chunk_tokens is not None and logprob_chunk_tokens < 0:
            errors.append(
                f"logprob_chunk_tokens must be >= 1 (tokens per LM-head chunk), or 0 / null (unchunked), "
                f"got {logprob_chunk_tokens}"
            )
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
        self.phase_seconds: dict[str, float] = {}  # this step's timing ledger (callbacks add to it too)
        self._val_records: dict[str, list[dict]] = {}
        self._predictions: list[dict] = []
        self._resolved: str | None = None
        self._parity = ParityGuard()
        self._rng_to_restore: list | None = None

    # ---- what the datamodule reads (lit_dash.contract.RolloutPolicy) ----------------------------------

    @property
    def update_spec(self) -> UpdateSpec:
        """The update's knobs, read from the hyper-parameters when used."""
        return UpdateSpec.from_hparams(self.hparams)

    @property
    def steps_per_rollout(self) -> int:
        """Optimizer steps every rollout takes (skipped ones included): 1, ppo_epochs or ppo_mini_batches."""
        return self.update_spec.steps_per_rollout

    @property
    def rollout_slices(self) -> int:
        """Slices the rollout buffer cuts the kept completions into: one per optimizer step in mini mode."""
        return self.update_spec.rollout_slices

    @property
    def model_cache(self) -> str | None:
        return self.hparams.model_cache

    @property
    def answer_fallback(self) -> bool:
        return bool(self.hparams.answer_fallback)

    @property
    def data(self) -> RolloutData:
        """The Trainer's datamodule, as the module uses it (lit_dash.contract.RolloutData)."""
        return self.trainer.datamodule

    def model_path(self) -> str:
        if self._resolved is None:
            self._resolved = resolve_model(self.model_name, self.hparams.model_cache)
        return self._resolved

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

    # ---- models -------------------------------------------------------------------------------------

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
        return merged_model(self.policy) if self.lora else self.policy

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

    def configure_optimizers(self):
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else None
        if self.hparams.max_rollouts is not None:  # the budget in rollouts, in optimizer steps
            total = self.hparams.max_rollouts * self.steps_per_rollout
        hp = self.hparams
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return build_optimizer(params, self.lr, hp.weight_decay, hp.warmup_steps, hp.lr_schedule, total)

    # ---- log-probs (lit_dash.training.policy) ---------------------------------------------------------

    def _compute_dtype(self) -> torch.dtype:
        return resolve_dtype(self.hparams.precision, self.device)

    def _autocast(self):
        return policy.autocast(self._compute_dtype(), self.device)

    def completion_logits(self, model: torch.nn.Module, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at completion positions only, ``[N, V]`` for the N completion tokens, and their targets."""
        return policy.completion_logits(model, mb, self._compute_dtype(), self.device)

    def completion_logprobs(
        self, model: torch.nn.Module, mb: MicroBatch, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``model``'s log-probs ``[N]`` of the completion tokens (and detached entropies), chunked by
        ``model.logprob_chunk_tokens``; see :func:`lit_dash.training.policy.completion_logprobs`."""
        chunk = self.hparams.logprob_chunk_tokens
        return policy.completion_logprobs(model, mb, self._compute_dtype(), self.device, chunk, with_entropy)

    def forward(self, micro_batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs and entropies at the sampling temperature (``logits / T``), ``[b, L-1]``,
        zero outside the completion positions."""
        logprobs, entropy = self.completion_logprobs(self.policy, micro_batch, with_entropy=True)
        return policy.scatter(logprobs, micro_batch, self.device), policy.scatter(
            entropy, micro_batch, self.device
        )

    @torch.no_grad()
    def _logprobs_of(self, model: torch.nn.Module, mb: MicroBatch) -> torch.Tensor:
        """``model``'s log-probs of the completion tokens at the sampling temperature (policy for PPO's
        old log-probs, reference for the KL)."""
        return policy.scatter(self.completion_logprobs(model, mb)[0], mb, self.device)

    # ---- the update (lit_dash.training.update) --------------------------------------------------------

    def _add_time(self, phase: str, seconds: float) -> None:
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + seconds

    def step_counts(self, micro_batches: list[MicroBatch], max_new_tokens: int) -> dict[str, float]:
        """Step-wide denominators, so the loss does not depend on how the step is split into micro-batches."""
        return update.step_counts(micro_batches, max_new_tokens)

    def normalizer_weight(self, counts: dict[str, float], sampled: tuple[float, float] | None) -> float:
        """Kept denominator / sampled denominator (:func:`lit_dash.training.update.normalizer_weight`)."""
        return update.normalizer_weight(self.update_spec, counts, sampled)

    def micro_batch_loss(
        self,
        mb: MicroBatch,
        counts: dict[str, float],
        old_logprobs: torch.Tensor | None = None,
        ref_logprobs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, float]]:
        """This micro-batch's share of the step loss and of the logged statistics: the module's forward
        (so a subclass that overrides it trains what it computes), then
        :func:`lit_dash.training.update.micro_batch_loss`."""
        logprobs, entropy = self(mb)
        spec = self.update_spec
        return update.micro_batch_loss(spec, mb, logprobs, entropy, counts, old_logprobs, ref_logprobs)

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
        spec = self.update_spec
        real = [i for i in chunk if i < len(micro_batches)]
        counts = update.step_counts([micro_batches[i] for i in real], self.last_rollout.max_new_tokens)
        values = self._reduce_over_ranks([*counts.values(), *(sampled or ())], "sum")
        counts = dict(zip(counts, values[: len(counts)], strict=True))
        sampled = tuple(values[len(counts) :]) if sampled else None
        weight = self.normalizer_weight(counts, sampled)
        world = self.trainer.world_size
        totals = update.zero_totals(spec)
        # the completions the loss is divided over (x max_new_tokens in constant mode)
        over_rollout = sampled is not None and spec.normalize_over == "rollout"
        totals["loss_denominator_completions"] = sampled[0] if over_rollout else counts["global_seqs"]
        for n, i in enumerate(chunk):
            with distributed.grad_sync(self.trainer, last=n == len(chunk) - 1):
                if i < len(micro_batches):
                    old_i = old[i] if old is not None else None
                    loss, stats = self.micro_batch_loss(micro_batches[i], counts, old_i, ref.get(i))
                    loss, stats["loss"] = loss * weight, stats["loss"] * weight
                    update.add_stats(totals, stats)
                else:
                    loss = distributed.zero_loss(self.policy, self.device, self._autocast())
                self.manual_backward(loss * world if world > 1 else loss)
        return totals

    def _reduce_over_ranks(self, values: list[float], op: str) -> list[float]:
        return distributed.reduce_over_ranks(self._trainer, values, op, self.device)

    # ---- the optimizer step (lit_dash.training.optim) -------------------------------------------------

    def _optimizer_step(self, loss: float = 0.0) -> float:
        """Clip and step; a non-finite loss or gradient norm skips the update (the grads are dropped)."""
        optimizer = self.optimizers()
        start = time.perf_counter()
        grad_norm = self._clip_gradients(optimizer)
        nonfinite = not (math.isfinite(loss) and math.isfinite(grad_norm))
        if self.trainer.strategy.reduce_boolean_decision(nonfinite, all=False):  # every rank skips together
            optimizer.zero_grad(set_to_none=True)  # AdamW leaves parameters without a gradient untouched
            self.nonfinite_steps += 1
            self.nonfinite_in_a_row += 1
            rank_zero_warn(
                nonfinite_warning(
                    self.nonfinite_in_a_row,
                    self.hparams.max_nonfinite_steps,
                    self.global_step,
                    loss,
                    grad_norm,
                )
            )
        else:
            self.nonfinite_in_a_row = 0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self.lr_schedulers().step()
        self._add_time("optimizer", time.perf_counter() - start)
        return grad_norm

    def _clip_gradients(self, optimizer) -> float:
        """The whole model's gradient norm before clipping, all ranks together, clipped to max_grad_norm
        (:func:`lit_dash.training.optim.clip_global_norm`)."""

        def clip_local(max_norm: float) -> None:
            self.clip_gradients(optimizer, gradient_clip_val=max_norm, gradient_clip_algorithm="norm")

        return clip_global_norm(
            optimizer, self.trainer.strategy.model, self.hparams.max_grad_norm, clip_local
        )

    # ---- the training step --------------------------------------------------------------------------

    def training_step(self, problems: list[Problem], batch_idx: int) -> None:
        self.phase_seconds = {}
        rollout = self.data.rollout(problems, self.reward)
        self.last_rollout = rollout
        for phase, seconds in rollout.timings.items():
            self._add_time(phase, seconds)
        stats = {f"train/{k}": v for k, v in rollout.stats().items()}
        stats["train/accuracy"] = float((rollout.rewards >= 1.0).float().mean())
        spec = self.update_spec
        # per slice, the most micro-batches any rank kept: every rank runs that many backward calls
        slice_sizes = list(rollout.slice_sizes)
        most = [int(n) for n in self._reduce_over_ranks(slice_sizes, "max")]
        first_step = self.global_step
        self.update_stats = []
        if sum(most) == 0:
            # Nothing informative survived filtering on any rank: counted no-op steps, as many as a rollout
            # takes. All grads are None, so AdamW leaves every weight untouched; stepping keeps Lightning's
            # step count (and the budget in rollouts) honest and advances the LR schedule.
            for n in range(spec.steps_per_rollout):
                self.skipped_steps += 1
                if n == 0:  # the guard watches steps that train on nothing too, before any update
                    stats.update(self._check_parity(*self._probe_gap(rollout), rollout))
                self.optimizers().zero_grad(set_to_none=True)
                self._optimizer_step()
            stats["train/optimizer_steps_per_rollout"] = float(self.global_step - first_step)
            self._log_step(stats, update.zero_totals(spec), float("nan"))
            return
        start = time.perf_counter()
        ref = {}
        if spec.kl_coef > 0:
            with self._reference_model() as reference:
                ref = {i: self._logprobs_of(reference, mb) for i, mb in enumerate(rollout.micro_batches)}
        old, gap = None, None
        if spec.update != "dash":  # PPO: the ratio is taken against the sampling-time policy
            old = {i: self._logprobs_of(self.policy, mb) for i, mb in enumerate(rollout.micro_batches)}
            gap = self._gap_of(rollout.micro_batches, old)
        self._add_time("ref_old_logprobs", time.perf_counter() - start)
        plan = update.update_plan(spec, slice_sizes, most)
        share = 1.0 / len(plan) if spec.update == "mini" else 1.0  # of the sampled completions
        # skipped prompts (data.prompt_skipping) count as G zero-advantage completions each
        sampled = (rollout.counted_completions * share, rollout.counted_tokens * share)
        totals, grad_norm = update.zero_totals(spec), float("nan")
        checked = False  # the parity guard runs on the first step that trains, before its update
        for chunk in plan:
            if not chunk:  # a mini-batch slice with nothing kept on any rank: a counted no-op step
                self.skipped_steps += 1
                self._optimizer_step()
                self.update_stats.append({"loss": 0.0, "skipped": 1.0})
                continue
            start = time.perf_counter()
            totals = self._accumulate(rollout.micro_batches, chunk, old, ref, sampled)
            on_policy_gap = tuple(totals.pop(k, 0.0) for k in update.GAP_KEYS)
            self._add_time("forward_backward", time.perf_counter() - start)
            if not checked:  # before the first update: stop here, not after training on a mismatched rollout
                checked = True
                stats.update(self._check_parity(*(gap if gap is not None else on_policy_gap), rollout))
            grad_norm = self._optimizer_step(totals["loss"])
            self.update_stats.append({**totals, "grad_norm": grad_norm})
        stats["train/optimizer_steps_per_rollout"] = float(self.global_step - first_step)
        self._log_step(stats, totals, grad_norm)

    def _log_step(self, stats: dict[str, float], totals: dict[str, float], grad_norm: float) -> None:
        """Log the step's scalars as the world's (every rank's rollout, see :mod:`lit_dash.world_metrics`),
        not rank 0's: every rank computes the same values, rank 0's logger writes them."""
        lr = self.lr_schedulers().get_last_lr()[0]
        metrics = step_metrics(
            stats,
            totals,
            grad_norm,
            lr,
            self.skipped_steps,
            self.nonfinite_steps,
            self.data,
            self.last_rollout,
        )
        metrics = world_values(metrics, rollout_weights(self.last_rollout), self.device)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        self.log("reward", metrics["train/reward_mean"], prog_bar=True, logger=False, batch_size=1)
        self.log("kept", metrics["train/kept_fraction"], prog_bar=True, logger=False, batch_size=1)

    # ---- the parity guard (lit_dash.training.parity) --------------------------------------------------

    @property
    def last_engine_gap(self) -> dict[str, float] | None:
        """The last step's parity figures (mean, max, tokens), or None when the engine gave no log-probs."""
        return self._parity.last_gap

    def _gap_of(self, micro_batches: list[MicroBatch], logprobs: dict[int, torch.Tensor]) -> GapParts:
        """This rank's engine/trainer gap (sum, max, tokens) of ``logprobs``, one per micro-batch."""
        parts = [
            losses.logprob_gap(
                logprobs[i], mb.engine_logprobs.to(self.device), mb.completion_mask.to(self.device)
            )
            for i, mb in enumerate(micro_batches)
            if mb.engine_logprobs is not None
        ]
        return gap_sums(parts)

    def _probe_gap(self, rollout: Rollout) -> GapParts:
        """The parity gap of a step that kept nothing, on the rollout's probe micro-batch of dropped
        completions: one forward without backward, so the guard also watches steps that train on nothing
        (a stale engine's samples may be exactly the ones filtering drops)."""
        probe = rollout.parity_probe
        if probe is None or probe.engine_logprobs is None:
            return 0.0, 0.0, 0.0
        start = time.perf_counter()
        gap = self._gap_of([probe], {0: self._logprobs_of(self.policy, probe)})
        self._add_time("ref_old_logprobs", time.perf_counter() - start)
        return gap

    def _engine(self) -> Engine | None:
        """The datamodule's engine: None outside a Trainer (or before the engine starts)."""
        return self.data.engine if self._trainer is not None and self.trainer.datamodule is not None else None

    def parity_threshold(self, rollout: Rollout | None = None) -> float:
        """model.parity_threshold, or the default for this trainer precision, the engine's dtype and the
        rollout's sampling (truncated by top-k / top-p or not)."""
        if self.hparams.parity_threshold is not None:
            return float(self.hparams.parity_threshold)
        engine = self._engine()
        return default_parity_threshold(
            self._compute_dtype(),
            engine.dtype if engine is not None else None,
            truncated=rollout is not None and rollout.truncated_sampling,
        )

    def _check_parity(self, gap_sum: float, gap_max: float, gap_tokens: float, rollout: Rollout) -> dict:
        """The step's engine/trainer log-prob gap over all ranks (logged), and the guard on it."""
        gap_sum, gap_tokens = self._reduce_over_ranks([gap_sum, gap_tokens], "sum")
        (gap_max,) = self._reduce_over_ranks([gap_max], "max")
        threshold = self.parity_threshold(rollout) if gap_tokens else 0.0

        def message(mean: float, most: float, tokens: float, threshold: float) -> str:
            return self._parity_message(mean, most, tokens, threshold, rollout)

        return self._parity.check(
            (gap_sum, gap_max, gap_tokens), self.hparams.parity_check, threshold, message
        )

    def _parity_message(
        self, mean: float, gap_max: float, tokens: float, threshold: float, rollout: Rollout
    ) -> str:
        engine = self._engine()
        chosen = self.hparams.parity_threshold is not None
        engine_dtype = engine.dtype if engine is not None else "unknown"
        return parity_message(
            self.global_step,
            mean,
            gap_max,
            tokens,
            threshold,
            chosen,
            rollout,
            self._compute_dtype(),
            engine_dtype,
        )

    # ---- validation, test and predict (lit-dash validate / test / predict) ---------------------------

    def validation_step(self, problems: list[Problem], batch_idx: int, dataloader_idx: int = 0) -> None:
        dm = self.data
        name = list(dm.evaluators)[dataloader_idx]
        records = dm.evaluators[name].score_batch(dm.engine, problems, self.reward)
        self._val_records.setdefault(name, []).extend(records)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_epoch(tag="validate", prefix="eval")

    def test_step(self, problems: list[Problem], batch_idx: int, dataloader_idx: int = 0) -> None:
        """``lit-dash test``: the eval sets, scored as in validation, logged as ``test/<set>/...``."""
        self.validation_step(problems, batch_idx, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._log_eval_epoch(tag="test", prefix="test")

    def _log_eval_epoch(self, tag: str, prefix: str) -> None:
        # each rank scored its own share of every set (the dataloader's unrepeated sampler); gathered,
        # every rank holds the whole set once and logs the same values
        records = {
            name: self._gather_shares(self._val_records.get(name, [])) for name in self.data.evaluators
        }
        records = {name: rs for name, rs in records.items() if rs}  # a set no batch of which ran
        for result in self.collect_eval_results(records, tag=tag):
            for key, value in result.metrics(prefix).items():
                # equal on every rank: max is an exact no-op reduction (and keeps Lightning from warning)
                self.log(key, value, add_dataloader_idx=False, batch_size=1, sync_dist=True, reduce_fx="max")
        self._val_records = {}

    def _gather_shares(self, records: list[dict]) -> list[dict]:
        return distributed.gather_shares(self._trainer, records)

    def predict_step(self, problems: list[Problem], batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """``lit-dash predict``: one greedy completion per prompt of ``data.predict_file`` (the eval
        sampling: temperature 0, ``eval_max_new_tokens``); problems with an ``answer`` are scored too."""
        dm = self.data
        evaluator = Evaluator(
            "predict", [], dm.prompt_style, dm.eval_max_new_tokens, instruction=dm.instruction,
            last_number_fallback=self.hparams.answer_fallback,
        )  # fmt: skip
        records = evaluator.predict_batch(dm.engine, problems, self.reward)
        self._predictions.extend(records)
        return records

    def on_predict_epoch_end(self) -> None:
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
        dm = self.data
        rank, world = self.trainer.global_rank, self.trainer.world_size
        records = {  # each rank scores its share of every set, no duplicates; gathered, the whole set once
            name: self._gather_shares(
                evaluator.records(dm.engine, self.reward, shard(evaluator.problems, rank, world))
            )
            for name, evaluator in dm.evaluators.items()
        }
        return self.collect_eval_results(records, tag="fit")

    # ---- checkpoints (lit_dash.checkpointing) ---------------------------------------------------------

    REFERENCE_PREFIX = REFERENCE_PREFIX

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # Lightning saves weights, optimizer, scheduler, step and the datamodule's prompt position;
        # the counters and the RNG states of every rank are ours to add, the reference ours to drop
        drop_reference(checkpoint.get("state_dict", {}))
        checkpoint["lit_dash"] = {
            "skipped_steps": self.skipped_steps,
            "nonfinite_steps": self.nonfinite_steps,
            "rng": rng_states_by_rank(),
        }
        if self.lora and "state_dict" in checkpoint:  # the adapters alone: the base reloads from disk
            trainable = {f"policy.{n}" for n, p in self.policy.named_parameters() if p.requires_grad}
            checkpoint["state_dict"] = adapter_state(checkpoint["state_dict"], trainable)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        state = checkpoint.get("lit_dash", {})
        self.skipped_steps = state.get("skipped_steps", 0)
        self.nonfinite_steps = state.get("nonfinite_steps", 0)
        self._rng_to_restore = state.get("rng")
        self.configure_model()
        if self.reference is not None and "state_dict" in checkpoint:  # the base model's, just loaded
            restore_reference(checkpoint["state_dict"], self.reference.state_dict())
        if self.lora and "state_dict" in checkpoint:  # strict load still checks every adapter key
            checkpoint["state_dict"] = with_frozen_base(checkpoint["state_dict"], self.state_dict())

    def on_train_start(self) -> None:
        # Restored here, not on load: between the two, Lightning creates the DataLoader iterator, which
        # draws from torch's generator; the interrupted run had drawn that before its checkpoint.
        if self._rng_to_restore is not None:
            restore_rng_states(self._rng_to_restore)
            self._rng_to_restore = None
