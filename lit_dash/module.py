"""The LightningModule: policy (trainable), frozen reference (only when kl_coef > 0), the reward hook,
and one optimizer step per rollout (DASH), or K passes / S mini-batch steps (PPO "multi" / "mini").

Optimisation is manual because the number of micro-batches that survive filtering changes every step.
The loss of a step is normalised by step-wide counts, so it is the same however the kept completions
were split into micro-batches.

The hooks here are thin: the models and their log-probs (:class:`~lit_dash.training.policy.PolicyModels`),
the loss, the parity guard, the optimizer and the ranks' plumbing live in :mod:`lit_dash.training`, one
concern a file; validate / test / predict in :mod:`lit_dash.eval_hooks`; what the module and the
datamodule ask of each other in :mod:`lit_dash.contract`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_dash.checkpointing import CheckpointHooks
from lit_dash.contract import RolloutData
from lit_dash.data.batches import MicroBatch
from lit_dash.data.buffer import Rollout
from lit_dash.data.records import Problem
from lit_dash.errors import ConfigError
from lit_dash.eval_hooks import EvalHooks
from lit_dash.evaluation import EvalResult, shard
from lit_dash.lora import lora_config
from lit_dash.models import check_model_name, resolve_model
from lit_dash.rewards import math_rewards
from lit_dash.step_metrics import rollout_weights, step_metrics
from lit_dash.training import distributed, optim, parity, policy, update
from lit_dash.training.optim import NonFiniteLossError
from lit_dash.training.parity import EngineParityError, default_parity_threshold  # their old import path
from lit_dash.training.parity_hooks import ParityHooks
from lit_dash.training.policy import PolicyModels
from lit_dash.training.update import UpdateSpec, budget_problems
from lit_dash.world_metrics import world_values

__all__ = ["DashModule", "EngineParityError", "NonFiniteLossError", "default_parity_threshold"]


class DashModule(PolicyModels, ParityHooks, EvalHooks, CheckpointHooks):
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
        kl_estimator: per-token KL to the reference (:func:`lit_dash.losses.kl_penalty`): k3 (GRPO's;
            its gradient is that of KL(ref || pi)), k3+ (k3's value, the gradient of KL(pi || ref)) or k2
            (the same gradient, a biased value); k1 is refused with kl_coef > 0 (zero expected gradient).
        kl_clamp: bound each token's KL value to +-kl_clamp (verl: 10); null (default): unbounded.
        kl_over: kept (the KL term on the completions filtering kept, as the paper's DASH: dropped rows
            cost no forward pass; divided by the sampled denominators, its weight is kl_coef x kept /
            sampled, none on a uniform group) or sampled (on every sampled completion, as TRL and verl: the
            dropped ones run forward and backward too, with advantage 0; needs normalize_over: rollout).
            Logged as train/kl_effective_coef.
        loss_agg: constant (Dr. GRPO / the paper: sum / (completions x max_new_tokens)),
            token_mean (DAPO) or seq_mean (GRPO).
        normalize_over: which completions the loss's denominators count (completions, tokens or
            sequences, by loss_agg): rollout (every completion sampled for the step, before filtering: a
            dropped completion weighs as a kept one with zero advantage, so at kl_coef 0 dropping
            zero-advantage completions leaves the gradient exactly as it was; a prompt skipped by
            data.prompt_skipping counts as G such completions, exactly with loss_agg constant or seq_mean;
            token_mean is refused with skipping, as their tokens are unknown) or kept (only those that
            survived filtering: the gradient grows by sampled / kept). In update=mini each step's slice
            counts 1/ppo_mini_batches of the rollout's sampled completions (rollout) or its own (kept).
        scale_rewards: divide advantages by the group's std (GRPO) or not (Dr. GRPO).
        clip_eps_low: PPO ratio clip below 1 (only binds off-policy: multi / mini).
        clip_eps_high: PPO ratio clip above 1 (DAPO clip-higher when larger than clip_eps_low).
        log_ratio_clamp: multi / mini: the log-ratio log pi - log pi_old is clamped to +-this before exp
            (verl's 20), so no ratio overflows; null: off.
        clip_ratio_c: multi / mini: the dual clip, a negative-advantage token's loss at most
            -A x clip_ratio_c (verl's 3; logged as train/dual_clip_fraction); null: off. Neither bound
            can bind on-policy (update: dash), where the ratio is exactly 1.
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
        bf16_dither: move weights that lie exactly on the bf16 grid (a model stored in bf16) to a seeded
            random place inside their bf16 cells at load, so bf16 copies (autocast, a bf16 engine) follow
            updates smaller than a bf16 step on average instead of all stalling (see
            lit_dash/training/bf16_cells.py); their bf16 values are unchanged. null (default): when the
            trainer or the engine computes in bf16; false: never.
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
        shared_prefix: (default true) a group's kept completions train as one packed row ``[prompt, c1,
            ..., ck]``, the prompt encoded once, not once per completion (lit_dash/data/packing.py): each
            completion sees the prompt and its own past, positions restart after the prompt, so log-probs
            and gradients are the per-row ones up to float rounding; SDPA models attend through a split
            attention that computes only those pairs (lit_dash/training/prefix_attention.py). Needs SDPA or
            eager attention and no sliding window (otherwise a warning names the reason and rows run one
            by one); false: one row per completion.

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
        kl_clamp: float | None = None,
        kl_over: str = "kept",
        loss_agg: str = "constant",
        normalize_over: str = "rollout",
        scale_rewards: bool = True,
        clip_eps_low: float = 0.2,
        clip_eps_high: float = 0.2,
        log_ratio_clamp: float | None = 20.0,
        clip_ratio_c: float | None = 3.0,
        update: str = "dash",
        ppo_epochs: int = 1,
        ppo_mini_batches: int = 1,
        max_rollouts: int | None = None,
        precision: str = "auto",
        bf16_dither: bool | None = None,
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
        shared_prefix: bool = True,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        errors = [
            *UpdateSpec.from_hparams(self.hparams).problems(),
            *optim.optim_problems(max_grad_norm, lr_schedule, max_nonfinite_steps),
            *parity.parity_problems(parity_check, parity_threshold),
            *budget_problems(max_rollouts),  # (update: the knob's name shadows the module here)
            *policy.chunk_problems(logprob_chunk_tokens),
        ]
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
        self._parity = parity.ParityGuard()
        self._rng_to_restore: list | None = None

    # ---- what the datamodule reads (lit_dash.contract.RolloutPolicy), and the models ---------------------

    @property
    def update_spec(self) -> UpdateSpec:
        """The update's knobs, read from the hyper-parameters when used (tests and benchmarks set them)."""
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
    def trains_dropped_rows(self) -> bool:
        """The buffer micro-batches the dropped completions too, at advantage 0 (kl_over: sampled)."""
        return self.update_spec.trains_dropped_rows

    @property
    def model_cache(self) -> str | None:
        return self.hparams.model_cache

    @property
    def answer_fallback(self) -> bool:
        return bool(self.hparams.answer_fallback)

    @property
    def data(self) -> RolloutData:
        """The Trainer's datamodule, as the module uses it (:class:`lit_dash.contract.RolloutData`)."""
        return self.trainer.datamodule

    def skipping_problems(self) -> list[str]:
        """What in the update's knobs cannot work with ``data.prompt_skipping`` (the datamodule asks)."""
        return self.update_spec.skipping_problems()

    def model_path(self) -> str:
        if self._resolved is None:
            self._resolved = resolve_model(self.model_name, self.hparams.model_cache)
        return self._resolved

    def apply_rollout_budget(self) -> None:
        """``max_rollouts`` becomes the trainer's ``max_steps``; RolloutDataModule.setup calls this before
        the engine starts, ``setup`` again for other datamodules."""
        trainer = self.trainer if self._trainer is not None else None
        update.apply_rollout_budget(trainer, self.hparams.max_rollouts, self.update_spec)

    def setup(self, stage: str) -> None:
        if stage == "fit":
            self.apply_rollout_budget()
            optim.check_clipping_strategy(self.trainer.strategy, self.hparams.max_grad_norm)

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
        hp = self.hparams
        total = self.trainer.max_steps if self.trainer and self.trainer.max_steps > 0 else None
        if hp.max_rollouts is not None:  # the budget in rollouts, in optimizer steps
            total = hp.max_rollouts * self.steps_per_rollout
        params = [p for p in self.policy.parameters() if p.requires_grad]
        return optim.build_optimizer(params, self.lr, hp.weight_decay, hp.warmup_steps, hp.lr_schedule, total)

    def configure_callbacks(self):
        """Weight sync is not optional: without it the engine keeps sampling from the initial weights."""
        from lit_dash.callbacks.weight_sync import WeightSync  # the one callback import: docs/how-it-works.md

        if any(isinstance(c, WeightSync) for c in self.trainer.callbacks):
            return []
        return [WeightSync()]

    # ---- the training step (lit_dash.training.update, .optim, .distributed) ----------------------------

    def training_step(self, problems: list[Problem], batch_idx: int) -> None:
        self.phase_seconds = {}
        rollout = self.last_rollout = self.data.rollout(problems, self.reward)
        for phase, seconds in rollout.timings.items():
            self._add_time(phase, seconds)
        stats = {f"train/{k}": v for k, v in rollout.stats().items()}
        stats["train/accuracy"] = float((rollout.rewards >= 1.0).float().mean())
        spec = self.update_spec
        # per slice, the most micro-batches any rank kept: every rank runs that many backward calls
        slice_sizes = list(rollout.slice_sizes)
        most = [int(n) for n in self._reduce_over_ranks(slice_sizes, "max")]
        first_step, self.update_stats = self.global_step, []
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
            return self._log_step(stats, update.zero_totals(spec), float("nan"))
        start, ref, old, gap = time.perf_counter(), {}, None, None
        if spec.kl_coef > 0:
            with self._reference_model() as reference:
                ref = {i: self._logprobs_of(reference, mb) for i, mb in enumerate(rollout.micro_batches)}
        if spec.update != "dash":  # PPO: the ratio is taken against the sampling-time policy
            old = {i: self._logprobs_of(self.policy, mb) for i, mb in enumerate(rollout.micro_batches)}
            gap = parity.micro_batch_gaps(rollout.micro_batches, old, self.device)
        self._add_time("ref_old_logprobs", time.perf_counter() - start)
        plan = update.update_plan(spec, slice_sizes, most)
        share = 1.0 / len(plan) if spec.update == "mini" else 1.0  # of the sampled completions
        # skipped prompts (data.prompt_skipping) count as G zero-advantage completions each
        sampled = (rollout.counted_completions * share, rollout.counted_tokens * share)
        totals, grad_norm, checked = update.zero_totals(spec), float("nan"), False
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
            if not checked:  # the guard, before the first update: stop before training on a mismatch
                checked = True
                stats.update(self._check_parity(*(gap if gap is not None else on_policy_gap), rollout))
            grad_norm = self._optimizer_step(totals["loss"])
            self.update_stats.append({**totals, "grad_norm": grad_norm})
        stats["train/optimizer_steps_per_rollout"] = float(self.global_step - first_step)
        self._log_step(stats, totals, grad_norm)

    def _add_time(self, phase: str, seconds: float) -> None:
        self.phase_seconds[phase] = self.phase_seconds.get(phase, 0.0) + seconds

    def step_counts(self, micro_batches: list[MicroBatch], max_new_tokens: int) -> dict[str, float]:
        """Step-wide denominators (:func:`lit_dash.training.update.step_counts`)."""
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
        (a subclass that overrides it trains what it computes), then
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
        counts = self.step_counts([micro_batches[i] for i in real], self.last_rollout.max_new_tokens)
        values = self._reduce_over_ranks([*counts.values(), *(sampled or ())], "sum")
        counts = dict(zip(counts, values[: len(counts)], strict=True))
        sampled = tuple(values[len(counts) :]) if sampled else None
        weight = self.normalizer_weight(counts, sampled)
        world = self.trainer.world_size
        totals = update.zero_totals(spec)
        if spec.kl_coef > 0:  # the KL's weight against a loss over every sampled completion
            totals["kl_effective_coef"] = spec.kl_coef * weight
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
            limit = self.hparams.max_nonfinite_steps
            rank_zero_warn(
                optim.nonfinite_warning(self.nonfinite_in_a_row, limit, self.global_step, loss, grad_norm)
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

        root = self.trainer.strategy.model
        return optim.clip_global_norm(optimizer, root, self.hparams.max_grad_norm, clip_local)

    def _log_step(self, stats: dict[str, float], totals: dict[str, float], grad_norm: float) -> None:
        """Log the step's scalars as the world's (every rank's rollout, see :mod:`lit_dash.world_metrics`),
        not rank 0's: every rank computes the same values, rank 0's logger writes them."""
        lr, counters = self.lr_schedulers().get_last_lr()[0], (self.skipped_steps, self.nonfinite_steps)
        metrics = step_metrics(stats, totals, grad_norm, lr, *counters, self.data, self.last_rollout)
        metrics = world_values(metrics, rollout_weights(self.last_rollout), self.device)
        self.log_dict(metrics, on_step=True, on_epoch=False, batch_size=1)
        self.log("reward", metrics["train/reward_mean"], prog_bar=True, logger=False, batch_size=1)
        self.log("kept", metrics["train/kept_fraction"], prog_bar=True, logger=False, batch_size=1)

    def evaluate(self) -> list[EvalResult]:
        """Greedy evaluation on every eval set of the datamodule (used by the evaluation callback)."""
        from lit_dash.callbacks.weight_sync import WeightSync

        for callback in self.trainer.callbacks:  # whatever the callback order, evaluate the current weights
            if isinstance(callback, WeightSync) and callback.synced_step != self.global_step:
                callback.sync(self.trainer, self)
        dm, rank, world = self.data, self.trainer.global_rank, self.trainer.world_size
        records = {  # each rank scores its share of every set, no duplicates; gathered, the whole set once
            name: self._gather_shares(
                evaluator.records(dm.engine, self.reward, shard(evaluator.problems, rank, world))
            )
            for name, evaluator in dm.evaluators.items()
        }
        return self.collect_eval_results(records, tag="fit")
