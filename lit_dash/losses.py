"""Pure tensor functions for GRPO-family / DASH policy optimisation.

Everything here is stateless and side-effect free: tensors in, tensors out. The training loop owns all
bookkeeping (which completions are kept, how they are split into micro-batches, which global counts to
pass); this module only does the arithmetic, so each piece can be unit-tested against numbers computed
by hand.

Shape conventions (used in every docstring):

* ``B``: number of completions (rows). Rewards/advantages are laid out *group-contiguous*: the ``G``
  completions of prompt ``p`` occupy rows ``p*G .. p*G+G-1``, so ``B = P * G``.
* ``T``: number of completion tokens (right-padded).
* ``V``: vocabulary size.
* ``mask``: ``[B, T]`` float or bool, 1/True on real completion tokens, 0/False on padding.

Why these particular pieces (see DASH, arXiv 2505.17218, and the GRPO / DAPO / Dr. GRPO papers):

* group-relative advantages replace a learned critic (GRPO);
* groups whose rewards are all equal give zero advantage, hence zero gradient, and are the samples DASH's
  preemptive sampling tries to avoid; ``zero_variance_groups`` finds them;
* DASH's gradient filtering drops samples with ``|A| <= 0.1`` (``filter_mask``) because they cost a full
  forward/backward but contribute almost nothing to the update; ``keep_mask`` applies the threshold in
  units of the group's std, so it keeps the same samples whether or not the advantages are std-scaled;
* the loss-aggregation mode decides how tokens are weighted (``aggregate_loss``), and it must give the same
  step loss however the kept samples are split into micro-batches (see ``aggregate_loss``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# advantages and sample selection live in lit_dash.advantages, the KL penalty in lit_dash.kl; named here
# too, as they always were
from lit_dash.advantages import filter_mask, group_advantages, keep_mask, zero_variance_groups
from lit_dash.kl import KL_ESTIMATORS, KL_GRADIENTS, kl_penalty

__all__ = [
    "KL_ESTIMATORS",
    "KL_GRADIENTS",
    "LOSS_AGG_MODES",
    "aggregate_loss",
    "chunked_logprobs_and_entropy",
    "entropy_from_logits",
    "filter_mask",
    "global_loss_counts",
    "group_advantages",
    "keep_mask",
    "kl_penalty",
    "logprob_gap",
    "logprob_temperature",
    "policy_loss",
    "token_logprobs",
    "truncated_importance_weights",
    "zero_variance_groups",
]

LOSS_AGG_MODES: tuple[str, ...] = ("token_mean", "seq_mean", "constant")


# --------------------------------------------------------------------------------------------------------
# Per-token objectives
# --------------------------------------------------------------------------------------------------------


def _float_mask(mask: Tensor, like: Tensor) -> Tensor:
    if mask.shape != like.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match {tuple(like.shape)}")
    return mask.to(like.dtype)


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor | None,
    advantages: Tensor,
    mask: Tensor,
    clip_eps_low: float = 0.2,
    clip_eps_high: float = 0.2,
    *,
    log_ratio_clamp: float | None = 20.0,
    clip_ratio_c: float | None = 3.0,
    return_dual_clip_fraction: bool = False,
) -> tuple[Tensor, Tensor] | tuple[Tensor, Tensor, Tensor]:
    """PPO clipped surrogate, per token, with the two bounds that keep stale tokens finite.

    Shapes: ``logprobs [B, T]``, ``old_logprobs [B, T]`` or ``None``, ``advantages [B]`` (one value per
    sequence, broadcast over its tokens; ``[B, T]`` is accepted too), ``mask [B, T]`` ->
    ``(per_token_loss [B, T], clip_fraction [])``, plus ``dual_clip_fraction []`` when
    ``return_dual_clip_fraction`` is set.

    ``ratio = exp(clamp(logprobs - old_logprobs, -log_ratio_clamp, log_ratio_clamp))`` and
    ``loss = -min(ratio * A, clip(ratio, 1 - clip_eps_low, 1 + clip_eps_high) * A)``. Separate low/high
    epsilons allow DAPO's "clip-higher". The loss is *not* masked (padding positions hold whatever the
    formula gives); ``aggregate_loss`` applies the mask.

    Two bounds matter only off-policy (several optimizer steps on one rollout, ``old_logprobs`` given),
    where a token's ratio can drift far from 1:

    * ``log_ratio_clamp`` (default 20, None: off): the log-ratio is clamped before ``exp``, so the ratio
      lies in ``[exp(-20), exp(20)]`` and can never overflow (fp32 ``exp`` is inf past 88.7, bf16's too).
      Where the clamp binds the ratio is a constant and the token's gradient is zero.
    * ``clip_ratio_c`` (default 3, must be > 1; None: off), the "dual clip": for a negative advantage the
      pessimistic min above keeps the *unclipped* ``-ratio * A``, which grows without bound with the
      ratio. The dual clip caps that token's loss at ``-A * clip_ratio_c``:
      ``loss = min(-min(ratio * A, clip(ratio) * A), -A * clip_ratio_c)`` for ``A < 0``. It binds on the
      tokens with ``ratio > clip_ratio_c`` (when ``clip_ratio_c >= 1 + clip_eps_high``, as with the
      defaults), and the token's gradient is zero where it binds. Tokens with ``A >= 0`` are untouched.

    ``old_logprobs=None`` means on-policy (one gradient step per batch, as in DASH): ``old = logprobs.detach()``
    so ratio is exactly 1, nothing is clipped, and the gradient is the vanilla policy gradient
    ``d loss / d logprobs = -A`` per token. Neither bound can bind at ratio 1 (the log-ratio is 0, and
    ``-A < -A * clip_ratio_c`` for ``A < 0``), and both are applied with ``clamp`` / ``where``, which pass
    values and gradients through unchanged where they do not bind, so the on-policy loss and its gradient
    are bit-identical to those of the unbounded formula (as are those of off-policy tokens in range).

    ``clip_fraction`` is the fraction of masked tokens on which the epsilon clip binds, i.e. the clipped
    term is strictly the smaller one (where the token's gradient is zeroed). The dual clip is *not*
    counted there, and cannot be: the epsilon clip binds for ``A < 0`` only below ``1 - clip_eps_low``,
    the dual clip only above ``clip_ratio_c > 1``, so the two sets of tokens are disjoint.
    ``dual_clip_fraction`` (the optional third value) is the fraction of masked tokens on which the
    dual-clip cap binds (verl logs it as ``pg_clipfrac_lower``); 0 when ``clip_ratio_c`` is None. Both
    fractions are detached, and 0 if the mask is empty. The log-ratio clamp has no count of its own: a
    token it binds on at ``exp(20)`` is counted by the epsilon clip (``A > 0``) or the dual clip, when on
    (``A < 0``), one at ``exp(-20)`` by the epsilon clip if ``A < 0``, and by neither if ``A > 0`` (its
    loss is ``-A exp(-20)``, its gradient zero).
    """
    if log_ratio_clamp is not None and not log_ratio_clamp > 0:
        raise ValueError(f"log_ratio_clamp must be > 0 (or None for no clamp), got {log_ratio_clamp}")
    if clip_ratio_c is not None and not clip_ratio_c > 1:
        raise ValueError(f"clip_ratio_c must be > 1 (or None for no dual clip), got {clip_ratio_c}")
    if old_logprobs is None:
        old_logprobs = logprobs.detach()
    if old_logprobs.shape != logprobs.shape:
        raise ValueError(
            f"old_logprobs shape {tuple(old_logprobs.shape)} != logprobs shape {tuple(logprobs.shape)}"
        )
    m = _float_mask(mask, logprobs)
    if advantages.dim() == 1:
        if advantages.shape[0] != logprobs.shape[0]:
            raise ValueError(f"advantages [B]={advantages.shape[0]} but logprobs has B={logprobs.shape[0]}")
        advantages = advantages.unsqueeze(-1)
    elif advantages.shape != logprobs.shape:
        raise ValueError(f"advantages must be [B] or [B, T], got {tuple(advantages.shape)}")
    advantages = advantages.to(logprobs.dtype)

    log_ratio = logprobs - old_logprobs
    if log_ratio_clamp is not None:
        log_ratio = torch.clamp(log_ratio, -log_ratio_clamp, log_ratio_clamp)
    ratio = torch.exp(log_ratio)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - clip_eps_low, 1.0 + clip_eps_high) * advantages
    per_token_loss = -torch.minimum(unclipped, clipped)

    dual_binds = None
    if clip_ratio_c is not None:
        cap = -advantages * clip_ratio_c  # the largest loss a negative-advantage token may have
        dual_binds = (advantages < 0) & (per_token_loss > cap)
        per_token_loss = torch.where(dual_binds, cap, per_token_loss)

    with torch.no_grad():
        denom = m.sum().clamp_min(1.0)
        clip_fraction = ((clipped < unclipped).to(m.dtype) * m).sum() / denom
        if return_dual_clip_fraction:
            if dual_binds is None:
                dual_clip_fraction = torch.zeros_like(clip_fraction)
            else:
                dual_clip_fraction = (dual_binds.to(m.dtype) * m).sum() / denom
    if return_dual_clip_fraction:
        return per_token_loss, clip_fraction, dual_clip_fraction
    return per_token_loss, clip_fraction


# --------------------------------------------------------------------------------------------------------
# Aggregation
# --------------------------------------------------------------------------------------------------------


def global_loss_counts(mask: Tensor) -> tuple[Tensor, Tensor]:
    """The global denominators ``aggregate_loss`` needs, computed once over a whole optimizer step.

    Shapes: ``mask [B, T]`` (all kept completions of the step) -> ``(tokens [], seqs [])``.

    ``tokens`` = number of masked tokens, ``seqs`` = number of sequences with at least one masked token
    (empty sequences are excluded by ``seq_mean``). Pass them as ``global_tokens`` / ``global_seqs`` to
    every micro-batch's ``aggregate_loss`` call.
    """
    m = mask.to(torch.float32) if not torch.is_floating_point(mask) else mask
    return m.sum(), (m.sum(dim=-1) > 0).sum()


def aggregate_loss(
    per_token_loss: Tensor,
    mask: Tensor,
    mode: str = "token_mean",
    *,
    global_tokens: float | Tensor | None = None,
    global_seqs: float | Tensor | None = None,
    normalizer: float | Tensor | None = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar.

    Shapes: ``per_token_loss [B, T]``, ``mask [B, T]`` -> ``[]``. Padding positions are excluded with
    ``torch.where`` so non-finite values there cannot leak into the result.

    Modes (``LOSS_AGG_MODES``):

    * ``"token_mean"`` (DAPO): ``sum(loss * mask) / N_tokens``; every token weighs the same, so long
      completions are not down-weighted.
    * ``"seq_mean"`` (original GRPO): mean over sequences of each sequence's token mean; sequences with no
      masked token are excluded.
    * ``"constant"`` (Dr. GRPO, and the DASH paper): ``sum(loss * mask) / normalizer`` with a constant
      ``normalizer`` (the paper uses rows x max_completion_length). Removes the length bias of the means.
      ``normalizer`` is required for this mode.

    Split invariance (micro-batching / gradient accumulation): the loop splits the kept completions of one
    optimizer step into micro-batches and *sums* their losses (accumulates gradients). A local mean per
    micro-batch would make the step loss depend on the split. To avoid that, pass the step's global count:

    * ``global_tokens``: total masked tokens over all micro-batches of the step (``token_mean``);
    * ``global_seqs``: total non-empty sequences over all micro-batches of the step (``seq_mean``);
    * ``normalizer``: the step's constant (``constant``), e.g. all rows of the step x max length.

    The micro-batch's *sum* (of tokens, resp. of per-sequence means) is then divided by that global count,
    so ``sum over micro-batches of aggregate_loss(mb)`` equals ``aggregate_loss(full batch)`` exactly, value
    and gradient. ``global_loss_counts(step_mask)`` computes ``global_tokens`` and ``global_seqs``. Counts
    for the other modes are ignored, so a loop may always pass both. Without a global count the local one
    is used (correct only when the step is a single micro-batch); an empty local mask then gives 0.
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; expected one of {LOSS_AGG_MODES}")
    if per_token_loss.dim() != 2:
        raise ValueError(f"per_token_loss must be [B, T], got shape {tuple(per_token_loss.shape)}")
    m = _float_mask(mask, per_token_loss)
    masked = torch.where(m > 0, per_token_loss, torch.zeros_like(per_token_loss)) * m

    if mode == "token_mean":
        denom = m.sum().clamp_min(1.0) if global_tokens is None else global_tokens
        return masked.sum() / denom

    if mode == "seq_mean":
        seq_tokens = m.sum(dim=-1)
        seq_means = masked.sum(dim=-1) / seq_tokens.clamp_min(1.0)  # empty rows contribute 0
        if global_seqs is None:
            denom = (seq_tokens > 0).sum().clamp_min(1).to(per_token_loss.dtype)
        else:
            denom = global_seqs
        return seq_means.sum() / denom

    # constant
    if normalizer is None:
        raise ValueError("mode='constant' needs normalizer (e.g. rows x max_completion_length of the step)")
    return masked.sum() / normalizer


# --------------------------------------------------------------------------------------------------------
# Logit utilities
# --------------------------------------------------------------------------------------------------------


def _upcast(x: Tensor) -> Tensor:
    """float16/bfloat16 -> float32; float32/float64 unchanged."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _tempered(logits: Tensor, temperature: float) -> Tensor:
    return logits if temperature == 1.0 else logits / temperature


def _row_chunks(n: int, chunk_size: int | None) -> list[slice]:
    if chunk_size is None or chunk_size >= n:
        return [slice(0, n)]
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return [slice(i, min(i + chunk_size, n)) for i in range(0, n, chunk_size)]


def logprob_temperature(temperature: float) -> float:
    """The temperature the trainer divides logits by: the sampling temperature, or 1 for greedy (0).

    vLLM does the same: a greedy request's log-probs are those of the untempered logits. Training on
    greedy samples is pointless anyway (all G completions of a prompt are the same).
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    return float(temperature) if temperature > 0 else 1.0


def entropy_from_logits(logits: Tensor, chunk_size: int | None = 8, temperature: float = 1.0) -> Tensor:
    """Per-token entropy of the softmax distribution of ``logits / temperature``.

    Shapes: ``logits [B, T, V]`` -> ``[B, T]`` in float32 (float64 if the logits are float64).

    ``temperature`` is the sampling temperature (see :func:`logprob_temperature`; 0 counts as 1), applied
    after the upcast, so the entropy is that of the distribution the completions were sampled from (the
    full tempered softmax: top-k / top-p truncation is not applied).

    ``H = -sum_v p_v log p_v`` computed from ``log_softmax`` (never ``log(softmax)``, which underflows to
    ``0 * -inf = nan`` for confident tokens). Work is done in (at least) float32 on ``chunk_size`` rows so a
    bf16 ``[B, T, V]`` tensor is never upcast as a whole. Mainly a monitoring metric (entropy collapse).
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    temperature = logprob_temperature(temperature)
    out = []
    for rows in _row_chunks(logits.shape[0], chunk_size):
        logp = torch.log_softmax(_tempered(_upcast(logits[rows]), temperature), dim=-1)
        out.append(-(logp.exp() * logp).sum(dim=-1))
    return torch.cat(out, dim=0)


def token_logprobs(
    logits: Tensor, token_ids: Tensor, chunk_size: int | None = 8, temperature: float = 1.0
) -> Tensor:
    """Log-probability of given tokens under ``softmax(logits / temperature)``.

    Shapes: ``logits [B, T, V]``, ``token_ids [B, T]`` (integer) -> ``[B, T]`` in float32 (float64 if
    the logits are float64).

    ``logits[b, t]`` must be the distribution that *predicts* ``token_ids[b, t]``: for a causal LM the
    caller shifts (``logits[:, prompt_len - 1 : -1]`` against the completion ids). Computed as
    ``gather(logits) - logsumexp(logits)`` in (at least) float32, ``chunk_size`` rows at a time, which never
    materialises a full-size log-softmax and keeps the float32 copy small for bf16 logits.

    ``temperature`` is the rollout's sampling temperature (0, greedy, counts as 1; see
    :func:`logprob_temperature`): the policy being optimised is the distribution the engine sampled from,
    so the ratio, the KL and the engine parity check all need ``log_softmax(logits / T)``. The division
    happens after the float32 upcast. Top-k / top-p truncation is *not* applied: the trainer uses the
    full tempered softmax, while the engine samples from (and reports log-probs of) the truncated,
    renormalised one; the two differ by ``-log(kept probability mass)`` per token.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if token_ids.shape != logits.shape[:2]:
        raise ValueError(
            f"token_ids shape {tuple(token_ids.shape)} does not match logits [B, T] {tuple(logits.shape[:2])}"
        )
    temperature = logprob_temperature(temperature)
    ids = token_ids.long().unsqueeze(-1)
    out = []
    for rows in _row_chunks(logits.shape[0], chunk_size):
        chunk = _tempered(_upcast(logits[rows]), temperature)
        picked = chunk.gather(-1, ids[rows]).squeeze(-1)
        out.append(picked - torch.logsumexp(chunk, dim=-1))
    return torch.cat(out, dim=0)


def chunked_logprobs_and_entropy(
    hidden: Tensor,
    head: Callable[[Tensor], Tensor],
    token_ids: Tensor,
    chunk_tokens: int | None,
    temperature: float = 1.0,
    with_entropy: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Log-probs (and entropies) of tokens from final hidden states, ``chunk_tokens`` tokens at a time.

    Shapes: ``hidden [N, H]`` (the hidden state that predicts each of the N tokens), ``token_ids [N]``
    (integer), ``head``: ``[n, H] -> [n, V]`` (the LM head) -> ``(logprobs [N], entropy [N] or None)`` in
    float32 (float64 if the head gives float64).

    The same numbers as :func:`token_logprobs` and :func:`entropy_from_logits` on ``head(hidden)``:
    ``log_softmax(head(h) / T)`` in (at least) float32, the target's entry gathered, entropy
    ``-sum_v p_v log p_v`` (detached: a monitoring figure). But the ``[N, V]`` logits never exist at once:
    each chunk of ``chunk_tokens`` tokens runs the head, the upcast and the log-softmax on its own, so the
    peak grows with ``chunk_tokens x V``, not ``N x V`` (8 x 2048 completion tokens of a 152k vocabulary:
    10 GB per float32 copy). When gradients are on and N is more than one chunk, each chunk runs under
    ``torch.utils.checkpoint`` (non-reentrant), so autograd keeps only ``[chunk, H]`` inputs and
    ``[chunk]`` outputs, and recomputes the chunk's logits in backward (one more LM-head matmul). N tokens
    that fit one chunk run as one, without the checkpoint: recomputing them would lower no peak.

    ``chunk_tokens`` None or 0: one chunk of all N tokens, no checkpoint (the unchunked computation).
    """
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [N, H], got shape {tuple(hidden.shape)}")
    if token_ids.shape != hidden.shape[:1]:
        raise ValueError(
            f"token_ids shape {tuple(token_ids.shape)} does not match hidden [N] {hidden.shape[0]}"
        )
    if chunk_tokens is not None and chunk_tokens < 0:
        raise ValueError(f"chunk_tokens must be >= 1 (tokens), or 0 / None for one chunk, got {chunk_tokens}")
    temperature = logprob_temperature(temperature)
    ids = token_ids.long()

    def one_chunk(h: Tensor, chunk_ids: Tensor) -> tuple[Tensor, Tensor]:
        logp = torch.log_softmax(_tempered(_upcast(head(h)), temperature), dim=-1)
        picked = logp.gather(-1, chunk_ids.unsqueeze(-1)).squeeze(-1)
        if not with_entropy:
            return picked, picked.new_zeros(())
        with torch.no_grad():
            entropy = -(logp.exp() * logp).sum(dim=-1)
        return picked, entropy

    n = hidden.shape[0]
    chunked = bool(chunk_tokens) and n > 0
    # N tokens that fit one chunk are not recomputed: that would cost one more LM-head matmul and
    # log-softmax and lower no peak (the head's backward runs first, while every decoder activation is
    # still alive, so its [N, V] tensors are at the peak either way)
    recompute = chunked and n > chunk_tokens and torch.is_grad_enabled() and hidden.requires_grad
    logprobs, entropies = [], []
    for tokens in _row_chunks(n, chunk_tokens if chunked else None):
        if recompute:
            picked, entropy = checkpoint(one_chunk, hidden[tokens], ids[tokens], use_reentrant=False)
        else:
            picked, entropy = one_chunk(hidden[tokens], ids[tokens])
        logprobs.append(picked)
        entropies.append(entropy)
    return torch.cat(logprobs), (torch.cat(entropies) if with_entropy else None)


# --------------------------------------------------------------------------------------------------------
# Engine / trainer mismatch
# --------------------------------------------------------------------------------------------------------


def logprob_gap(logprobs: Tensor, engine_logprobs: Tensor, mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """How far the trainer's log-probs are from the engine's, over the masked tokens.

    Shapes: ``logprobs [B, T]``, ``engine_logprobs [B, T]``, ``mask [B, T]`` ->
    ``(sum |difference| [], max |difference| [], tokens [])``, all detached float64 (sums and maxima of
    micro-batches combine exactly; the mean gap is ``sum / tokens``). An empty mask gives ``(0, 0, 0)``.

    Both sides must be log-probs of the same token under the same (tempered) distribution; in exact
    arithmetic the difference is zero, so what is left measures the engine/trainer mismatch: precision,
    kernels, a stale engine, a wrong temperature, or the mass top-k / top-p truncation removed.
    """
    if logprobs.shape != engine_logprobs.shape:
        raise ValueError(
            f"engine_logprobs shape {tuple(engine_logprobs.shape)} != logprobs shape {tuple(logprobs.shape)}"
        )
    m = _float_mask(mask, logprobs) > 0
    diff = (logprobs.detach().double() - engine_logprobs.detach().double()).abs()[m]
    if diff.numel() == 0:
        zero = torch.zeros((), dtype=torch.float64, device=logprobs.device)
        return zero, zero.clone(), zero.clone()
    return diff.sum(), diff.max(), torch.tensor(float(diff.numel()), dtype=torch.float64, device=diff.device)


def truncated_importance_weights(old_logprobs: Tensor, engine_logprobs: Tensor, cap: float) -> Tensor:
    """Truncated importance sampling (TIS) weights for an engine that samples from a slightly different
    distribution than the trainer computes.

    Shapes: ``old_logprobs [B, T]`` (the trainer's log-probs of the sampled tokens before the update;
    on-policy, the current ones), ``engine_logprobs [B, T]`` (what the engine sampled them with) ->
    ``[B, T]``, detached: ``min(exp(old_logprobs - engine_logprobs), cap)``.

    The rollout comes from the engine's distribution ``mu``; the gradient wants samples from the trainer's
    ``pi_old``. Weighting each token's policy-gradient term by ``pi_old / mu`` corrects for that, and the
    cap bounds the variance a token the engine found much less likely than the trainer would add
    (Yao et al., "Your efficient RL framework secretly brings you off-policy RL training", 2025; TRL
    and verl implement the same). Weights are constants (no gradient flows through them).
    """
    if cap <= 0:
        raise ValueError(f"the TIS cap must be > 0, got {cap}")
    if old_logprobs.shape != engine_logprobs.shape:
        raise ValueError(
            f"engine_logprobs shape {tuple(engine_logprobs.shape)} != old_logprobs shape "
            f"{tuple(old_logprobs.shape)}"
        )
    with torch.no_grad():
        return torch.exp(old_logprobs.detach() - engine_logprobs.detach()).clamp(max=cap)
