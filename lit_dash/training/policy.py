"""The policy: loading it (and the frozen KL reference), and its per-token log-probs of a micro-batch's
completions at the sampling temperature, under the trainer's autocast; :class:`PolicyModels` holds the
module's side of it (the models, ``forward``).

Only completion positions go through the LM head: prompt positions never need logits, and the vocabulary
projection with its log-softmax dominates a small model's step (49k vocabulary).
"""

from __future__ import annotations

import contextlib
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from transformers import AutoModelForCausalLM

from lit_dash import losses
from lit_dash.data.batches import MicroBatch
from lit_dash.data.packing import shared_prefix_problem
from lit_dash.hardware import resolve_dtype
from lit_dash.lora import apply_lora, is_lora, merged_model, parameter_bytes
from lit_dash.training import prefix_attention
from lit_dash.training.bf16_cells import dither_within_bf16_cells


def autocast(dtype: torch.dtype, device: torch.device) -> contextlib.AbstractContextManager:
    """The compute dtype's autocast on ``device``; float32 runs without one (weights stay float32)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def completion_hidden(
    model: torch.nn.Module, mb: MicroBatch, dtype: torch.dtype, device: torch.device, packed: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Final hidden states at completion positions only, ``[N, H]`` for the N completion tokens (the
    state that predicts each), and their targets ``[N]``. A micro-batch with a packed layout
    (``model.shared_prefix``) runs its packed rows, each prompt once, unless ``packed`` is false; the
    states come out in the per-row order either way."""
    ids = mb.input_ids.to(device)
    positions = mb.completion_mask.to(device) > 0
    targets = ids[:, 1:][positions]
    layout = mb.packed if packed else None
    if layout is not None:
        implementation = model.config._attn_implementation
        if implementation == prefix_attention.NAME:  # the split attention: no mask, a plan
            attend = {prefix_attention.PLAN_KEYWORD: prefix_attention.split_plan(layout, device)}
        else:  # SDPA or eager with the dense 4-D mask
            attend = {"attention_mask": layout.attention_mask(implementation, device)}
        with autocast(dtype, device):
            hidden = model.get_decoder()(
                input_ids=layout.input_ids.to(device), position_ids=layout.position_ids.to(device), **attend
            ).last_hidden_state
        return hidden.flatten(0, 1)[layout.hidden_index.to(device)], targets
    with autocast(dtype, device):
        hidden = model.get_decoder()(input_ids=ids, attention_mask=mb.attention_mask.to(device))
    return hidden.last_hidden_state[:, :-1][positions], targets


def completion_logits(
    model: torch.nn.Module, mb: MicroBatch, dtype: torch.dtype, device: torch.device, packed: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits at completion positions only, ``[N, V]`` for the N completion tokens, and their targets."""
    hidden, targets = completion_hidden(model, mb, dtype, device, packed)
    with autocast(dtype, device):
        return model.get_output_embeddings()(hidden), targets


def completion_logprobs(
    model: torch.nn.Module,
    mb: MicroBatch,
    dtype: torch.dtype,
    device: torch.device,
    chunk_tokens: int | None,
    with_entropy: bool = False,
    packed: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``model``'s log-probs of the N completion tokens at the sampling temperature, ``[N]``, and with
    ``with_entropy`` their entropies (detached). With ``chunk_tokens`` the LM head and the log-softmax
    run on that many tokens at a time (recomputed in backward), so no ``[N, V]`` logits are kept; null /
    0 computes (and autograd keeps) the full ``[N, V]`` logits. ``packed``: run a packed layout when the
    micro-batch has one (:func:`completion_hidden`)."""
    temperature = mb.temperature
    if not chunk_tokens:
        logits, targets = completion_logits(model, mb, dtype, device, packed)
        logprobs = losses.token_logprobs(logits[None], targets[None], temperature=temperature)[0]
        entropy = None
        if with_entropy:
            with torch.no_grad():
                entropy = losses.entropy_from_logits(logits.detach()[None], temperature=temperature)[0]
        return logprobs, entropy
    hidden, targets = completion_hidden(model, mb, dtype, device, packed)
    lm_head = model.get_output_embeddings()

    def head(h: torch.Tensor) -> torch.Tensor:
        with autocast(dtype, device):  # re-entered when the checkpoint recomputes the chunk in backward
            return lm_head(h)

    return losses.chunked_logprobs_and_entropy(hidden, head, targets, chunk_tokens, temperature, with_entropy)


def scatter(values: torch.Tensor, mb: MicroBatch, device: torch.device) -> torch.Tensor:
    """Per-completion-token ``values`` ``[N]`` back into the micro-batch's ``[b, L-1]`` layout, zero
    outside the completion positions."""
    out = values.new_zeros(mb.completion_mask.shape, device=device)
    out[mb.completion_mask.to(device) > 0] = values
    return out


def chunk_problems(logprob_chunk_tokens: int | None) -> list[str]:
    """What is wrong with ``model.logprob_chunk_tokens``, if anything."""
    if logprob_chunk_tokens is not None and logprob_chunk_tokens < 0:
        return [
            f"logprob_chunk_tokens must be >= 1 (tokens per LM-head chunk), or 0 / null (unchunked), "
            f"got {logprob_chunk_tokens}"
        ]
    return []


def load_policy(
    path: str,
    gradient_checkpointing: bool,
    lora: dict[str, Any] | None,
    with_reference: bool,
    dither_seed: int | None = None,
) -> tuple[torch.nn.Module, torch.nn.Module | None]:
    """The trainable policy (float32 master weights, whatever the compute dtype) and the frozen KL
    reference when ``with_reference``: a second copy of the model, or under LoRA none, since the base
    with its adapters disabled is the reference. With ``dither_seed``, weights that lie on the bf16 grid
    are moved inside their bf16 cells (:mod:`lit_dash.training.bf16_cells`), the reference's the same."""
    model = _load(path, dither_seed)
    if gradient_checkpointing:
        model.gradient_checkpointing_enable()
    model.config.use_cache = False
    if lora is not None:
        if gradient_checkpointing:  # frozen embeddings: checkpointed blocks need a grad input
            model.enable_input_require_grads()
        model = apply_lora(model, lora)
        trainable = parameter_bytes(model, trainable=True)
        frozen = parameter_bytes(model, trainable=False)
        saved = f"; reference = base with adapters disabled, {frozen / 2**20:.0f} MiB not loaded twice"
        rank_zero_info(
            f"[lit_dash] LoRA: {trainable / 2**20:.1f} MiB of adapters train, {frozen / 2**20:.0f} MiB of "
            f"base frozen{saved if with_reference else ''}"
        )
        return model, None
    if not with_reference:
        return model, None
    reference = _load(path, dither_seed)
    reference.requires_grad_(False).eval()
    return model, reference


def _load(path: str, dither_seed: int | None) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    if dither_seed is not None:
        moved = dither_within_bf16_cells(model, dither_seed)
        if moved:
            rank_zero_info(
                f"[lit_dash] {moved} parameters lie on the bf16 grid: moved inside their bf16 cells, so the "
                "bf16 copies (autocast, the engine) follow small updates (model.bf16_dither)"
            )
    return model


class PolicyModels(L.LightningModule):
    """The module's models and their log-probs, as a mixin of :class:`lit_dash.module.DashModule`: it
    loads the policy and the KL reference (``configure_model``), and runs them on micro-batches under
    the trainer's autocast. Needs ``model_path()``, ``kl_coef`` and the ``precision``,
    ``gradient_checkpointing``, ``lora``, ``bf16_dither``, ``logprob_chunk_tokens`` and ``shared_prefix``
    hyper-parameters, and ``seed``."""

    policy: torch.nn.Module | None
    reference: torch.nn.Module | None
    kl_coef: float
    _packs_policy: tuple[int, bool] | None = None  # (id of the policy checked, whether it runs packed rows)

    @property
    def shared_prefix(self) -> bool:
        """Whether the buffer packs each group behind one prompt (model.shared_prefix; the datamodule reads
        it before the model loads, so a model that cannot run packed rows still gets whole groups per
        micro-batch and runs them per row)."""
        return bool(self.hparams.get("shared_prefix", False))

    def packed_forward(self) -> bool:
        """Whether the forward runs the micro-batches' packed rows: model.shared_prefix, unless the policy
        cannot take them (:func:`lit_dash.data.packing.shared_prefix_problem`; warned once per model)."""
        if not self.shared_prefix or self.policy is None:
            return False
        if self._packs_policy is None or self._packs_policy[0] != id(self.policy):
            problem = shared_prefix_problem(self.policy)
            if problem is not None:
                rank_zero_warn(
                    f"[lit_dash] model.shared_prefix is off for this model (rows run one by one): {problem}"
                )
            self._packs_policy = (id(self.policy), problem is None)
        return self._packs_policy[1]

    def configure_model(self) -> None:
        if self.policy is None:
            hp = self.hparams
            self.policy, self.reference = load_policy(
                self.model_path(),
                hp.gradient_checkpointing,
                hp.lora,
                with_reference=self.kl_coef > 0,
                dither_seed=(self.seed or 0) if self._bf16_dither() else None,
            )
            if self.shared_prefix:  # packed rows attend through the split attention where the model is SDPA
                for model in (self.policy, self.reference):
                    if model is not None:
                        prefix_attention.install(model)

    def _bf16_dither(self) -> bool:
        """model.bf16_dither, or (null) whether a bf16 copy computes with these weights: the trainer's
        autocast, or the engine (when the Trainer has one)."""
        if self.hparams.bf16_dither is not None:
            return bool(self.hparams.bf16_dither)
        data = self._trainer.datamodule if self._trainer is not None else None
        engine = getattr(data, "engine", None)
        return torch.bfloat16 in (self._compute_dtype(), getattr(engine, "dtype", None))

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

    def _compute_dtype(self) -> torch.dtype:
        return resolve_dtype(self.hparams.precision, self.device)

    def _autocast(self) -> contextlib.AbstractContextManager:
        return autocast(self._compute_dtype(), self.device)

    def completion_logits(self, model: torch.nn.Module, mb: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits at completion positions only, ``[N, V]`` for the N completion tokens, and their targets."""
        return completion_logits(model, mb, self._compute_dtype(), self.device, self.packed_forward())

    def completion_logprobs(
        self, model: torch.nn.Module, mb: MicroBatch, with_entropy: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``model``'s log-probs ``[N]`` of the completion tokens (and detached entropies), chunked by
        ``model.logprob_chunk_tokens`` (:func:`completion_logprobs`)."""
        chunk = self.hparams.logprob_chunk_tokens
        return completion_logprobs(
            model, mb, self._compute_dtype(), self.device, chunk, with_entropy, packed=self.packed_forward()
        )

    def forward(self, micro_batch: MicroBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-token log-probs and entropies at the sampling temperature (``logits / T``), ``[b, L-1]``,
        zero outside the completion positions."""
        logprobs, entropy = self.completion_logprobs(self.policy, micro_batch, with_entropy=True)
        return scatter(logprobs, micro_batch, self.device), scatter(entropy, micro_batch, self.device)

    @torch.no_grad()
    def _logprobs_of(self, model: torch.nn.Module, mb: MicroBatch) -> torch.Tensor:
        """``model``'s log-probs of the completion tokens at the sampling temperature (policy for PPO's
        old log-probs, reference for the KL)."""
        return scatter(self.completion_logprobs(model, mb)[0], mb, self.device)
