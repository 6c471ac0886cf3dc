"""Shared-prefix training (model.shared_prefix, lit_dash/data/packing.py): a group's completions packed
behind one prompt give the per-row layout's per-token log-probs and gradients.

The layout and the packing are checked by hand; the forward against the per-row path on the tiny model
in fp32 (the exact invariant, with two broken layouts as negative controls) and in bf16 (against the
per-row path's own bf16 error); fits against per-row fits through the real engine, for the update
modes, KL scopes, TIS, LoRA, gradient checkpointing and chunked log-probs.
"""

from __future__ import annotations

import random
import warnings

import lightning as L
import pytest
import torch
from fitting import fit
from numerics import fp32_sum_error
from tiny_reward import ParityRewardModule
from transformers import AutoModelForCausalLM

from lit_dash.data.batches import pad_completions
from lit_dash.data.datamodule import EngineConfig, ProblemSource, RolloutDataModule
from lit_dash.data.packing import PAD, PackedLayout, pack_groups, packed_layout, shared_prefix_problem
from lit_dash.engines import SamplingConfig
from lit_dash.engines.base import Completion
from lit_dash.training import prefix_attention
from lit_dash.training.policy import completion_logprobs

CPU = torch.device("cpu")


# ---- the layout and the packing, by hand -----------------------------------------------------------------


def _completion(prompt: int, ids: list[int]) -> Completion:
    return Completion(prompt, "", ids, [0.0] * len(ids), False)


def test_a_packed_row_holds_the_prompt_once_and_positions_restart_after_it():
    prompts = [[11, 12, 13], [21, 22]]
    comps = [_completion(0, [1, 2]), _completion(0, [3]), _completion(1, [4, 5, 6])]
    lay = packed_layout(
        [0, 1, 2], {0: 0, 1: 0, 2: 1}, prompts, {r: c.token_ids for r, c in enumerate(comps)}, 0
    )
    assert lay.input_ids.tolist() == [[11, 12, 13, 1, 2, 3], [21, 22, 4, 5, 6, 0]]
    assert lay.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 2, 3, 4, 0]]
    assert lay.segments.tolist() == [[0, 0, 0, 1, 1, 2], [0, 0, 1, 1, 1, PAD]]
    # the state predicting each completion token: row 0's prompt end (2) for tokens 1 and 3, token 1's
    # own state (3) for token 2; row 1 (offset 6): prompt end 7, then 8 and 9
    assert lay.hidden_index.tolist() == [2, 3, 2, 7, 8, 9]
    assert lay.num_tokens == 11 and lay.padded_tokens == 12


def test_the_mask_lets_a_completion_see_the_prompt_and_its_own_past_only():
    lay = PackedLayout(
        torch.zeros(1, 6, dtype=torch.long), torch.zeros(1, 6, dtype=torch.long),
        torch.tensor([[0, 0, 1, 1, 2, PAD]]), torch.zeros(0, dtype=torch.long),
    )  # fmt: skip
    expected = [
        [1, 0, 0, 0, 0, 0],  # prompt: causal
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],  # completion 1: the prompt, then itself
        [1, 1, 1, 1, 0, 0],
        [1, 1, 0, 0, 1, 0],  # completion 2: the prompt and itself, never completion 1
        [0, 0, 0, 0, 0, 1],  # padding: itself alone (no empty softmax row)
    ]
    assert lay.allowed()[0, 0].int().tolist() == expected
    eager = lay.attention_mask("eager", CPU)[0, 0]
    assert eager.dtype == torch.float32 and torch.equal(eager == 0, lay.allowed()[0, 0])
    with pytest.raises(ValueError, match="flash_attention_2.*cannot take"):
        lay.attention_mask("flash_attention_2", CPU)


def test_groups_stay_together_and_a_large_group_splits_at_the_micro_batch_size():
    prompt_of = {r: r // 4 for r in range(12)}  # three prompts, four completions each
    length = dict.fromkeys(range(12), 5)
    prompt_length = {0: 10, 1: 10, 2: 30}
    # 8 completions a micro-batch: two whole groups fit, the third (the longest row) goes first
    assert pack_groups(list(range(12)), prompt_of, length, prompt_length, 8) == [
        [8, 9, 10, 11, 0, 1, 2, 3], [4, 5, 6, 7]
    ]  # fmt: skip
    # 3 a micro-batch: each group splits into 3 + 1 (packed widths 25 + 15, the third 45 + 35); the
    # three single leftovers fill one micro-batch, longest first: 12 completions in 4 micro-batches
    assert pack_groups(list(range(12)), prompt_of, length, prompt_length, 3) == [
        [8, 9, 10], [11, 3, 7], [0, 1, 2], [4, 5, 6]
    ]  # fmt: skip
    # a padded-token budget: packed widths 50 (prompt 2) and 30; two rows of 30 fit 60, 50 + 30 (2 x 50) not
    assert pack_groups(list(range(12)), prompt_of, length, prompt_length, 12, max_tokens=60) == [
        [8, 9, 10, 11], [0, 1, 2, 3, 4, 5, 6, 7]
    ]  # fmt: skip
    assert len(pack_groups(list(range(12)), prompt_of, length, prompt_length, 12, max_tokens=59)) == 3


# ---- the forward: per-token log-probs and gradients against the per-row path ------------------------------


def _random_groups(vocab: int, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(vocab) for _ in range(rng.randint(4, 9))] for _ in range(3)]
    comps = [
        _completion(p, [rng.randrange(vocab) for _ in range(rng.randint(1, 7))])
        for p in range(3)
        for _ in range(4)
    ]
    return prompts, comps


@pytest.fixture(scope="module")
def tiny_fp32(tiny_model_path):
    return AutoModelForCausalLM.from_pretrained(
        tiny_model_path, dtype=torch.float32, attn_implementation="sdpa"
    )


def _logprobs_and_grads(model, mb, packed: bool, dtype=torch.float32, chunk=None):
    model.zero_grad(set_to_none=True)
    logprobs, entropy = completion_logprobs(model, mb, dtype, CPU, chunk, True, packed=packed)
    weights = torch.linspace(-1.0, 1.0, len(logprobs))  # every token's gradient counts, with its own sign
    (logprobs * weights).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logprobs.detach(), entropy, grads


def _worst_grad(a: dict, b: dict) -> float:
    """The largest gradient difference, relative to each parameter's largest gradient entry."""
    return max(float((a[n] - b[n]).abs().max() / a[n].abs().max().clamp_min(1e-30)) for n in a)


@pytest.mark.parametrize("implementation", ["split", "sdpa", "eager"])
@pytest.mark.parametrize("chunk", [None, 4])
def test_packed_logprobs_and_gradients_equal_the_per_row_ones_in_fp32(tiny_model_path, implementation, chunk):
    """split: lit_dash's split attention (installed over SDPA: per-row rows run SDPA); sdpa / eager: the
    dense 4-D mask."""
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_path,
        dtype=torch.float32,
        attn_implementation="eager" if implementation == "eager" else "sdpa",
    )
    if implementation == "split":
        assert prefix_attention.install(model) and model.config._attn_implementation == prefix_attention.NAME
    prompts, comps = _random_groups(model.config.vocab_size)
    rows = list(range(len(comps)))
    mb = pad_completions(rows, prompts, comps, torch.randn(len(rows)), 0, 0.7, shared_prefix=True)
    assert mb.packed.num_tokens < int(mb.attention_mask.sum())  # three prompts, not twelve
    row_lp, row_ent, row_grads = _logprobs_and_grads(model, mb, packed=False, chunk=chunk)
    lp, ent, grads = _logprobs_and_grads(model, mb, packed=True, chunk=chunk)
    bound = fp32_sum_error(model.config.vocab_size)  # the longest reduction on the path
    assert lp.shape == row_lp.shape and torch.allclose(lp, row_lp, rtol=1e-5, atol=bound * row_lp.abs().max())
    assert torch.allclose(ent, row_ent, rtol=1e-5, atol=bound * row_ent.abs().max())
    assert set(grads) == set(row_grads) and _worst_grad(row_grads, grads) < 1e-5


def _broken(mb, how: str):
    lay = mb.packed
    if how == "completions see each other":  # every completion token counted as prompt: plain causal
        segments = torch.where(lay.segments > 0, torch.zeros_like(lay.segments), lay.segments)
        return PackedLayout(lay.input_ids, lay.position_ids, segments, lay.hidden_index)
    positions = torch.arange(lay.input_ids.shape[1]).expand_as(lay.input_ids)  # no restart after the prompt
    return PackedLayout(lay.input_ids, positions.contiguous(), lay.segments, lay.hidden_index)


@pytest.mark.parametrize("how", ["completions see each other", "positions run on"])
def test_a_wrong_mask_or_wrong_positions_change_the_logprobs(tiny_fp32, how):
    """The negative controls: the check above fails on a layout with either mistake."""
    prompts, comps = _random_groups(tiny_fp32.config.vocab_size)
    rows = list(range(len(comps)))
    mb = pad_completions(rows, prompts, comps, torch.zeros(len(rows)), 0, 1.0, shared_prefix=True)
    row_lp, _, row_grads = _logprobs_and_grads(tiny_fp32, mb, packed=False)
    mb.packed = _broken(mb, how)
    lp, _, grads = _logprobs_and_grads(tiny_fp32, mb, packed=True)
    lengths = torch.tensor([len(c.token_ids) for c in comps])
    later = torch.ones(len(lp), dtype=torch.bool)
    later[lengths.cumsum(0) - lengths] = (
        False  # a first token is predicted by the prompt's end: right either way
    )
    assert (lp - row_lp)[later].abs().max() > 1e-3
    assert _worst_grad(row_grads, grads) > 1e-3


def test_the_split_attention_equals_sdpa_with_the_dense_mask():
    """On random queries, keys and values (grouped-query: 6 heads over 2 key/value heads), every real
    position's output is the dense-mask SDPA's; a plan whose completions see the whole row is not."""
    torch.manual_seed(0)
    prompts, comps = _random_groups(1000, seed=2)
    rows = list(range(len(comps)))
    lay = packed_layout(
        rows,
        {r: c.prompt_index for r, c in enumerate(comps)},
        prompts,
        {r: c.token_ids for r, c in enumerate(comps)},
        0,
    )
    r, w = lay.input_ids.shape
    q, k, v = torch.randn(r, 6, w, 8), torch.randn(r, 2, w, 8), torch.randn(r, 2, w, 8)
    dense = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(3, dim=1), v.repeat_interleave(3, dim=1), attn_mask=lay.allowed()
    ).transpose(1, 2)
    real = lay.segments != PAD
    plan = prefix_attention.split_plan(lay, CPU)
    out, _ = prefix_attention.split_attention(None, q, k, v, None, **{prefix_attention.PLAN_KEYWORD: plan})
    assert out.shape == dense.shape and torch.allclose(out[real], dense[real], atol=1e-6)
    assert torch.count_nonzero(out[~real]) == 0
    plan.key_mask = torch.ones_like(plan.key_mask)  # the control: completions see padding and each other
    wrong, _ = prefix_attention.split_attention(None, q, k, v, None, **{prefix_attention.PLAN_KEYWORD: plan})
    assert (wrong[real] - dense[real]).abs().max() > 1e-2


def test_a_model_with_the_split_attention_runs_padded_rows_as_sdpa(tiny_model_path):
    """Without a plan (per-row micro-batches, evaluation) the installed attention is SDPA, its padding
    mask included: left-padded rows give the same last-position logits."""
    sdpa = AutoModelForCausalLM.from_pretrained(
        tiny_model_path, dtype=torch.float32, attn_implementation="sdpa"
    )
    split = AutoModelForCausalLM.from_pretrained(
        tiny_model_path, dtype=torch.float32, attn_implementation="sdpa"
    )
    prefix_attention.install(split)
    ids = torch.tensor([[0, 0, 5, 6, 7], [1, 2, 3, 4, 5]])
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        a = sdpa(input_ids=ids, attention_mask=mask).logits[:, -1]
        b = split(input_ids=ids, attention_mask=mask).logits[:, -1]
        unmasked = split(input_ids=ids).logits[:, -1]  # the control: padding attended
    assert torch.allclose(a, b, atol=1e-5)
    assert (unmasked[0] - a[0]).abs().max() > 1e-3


def test_packed_bf16_is_as_close_to_fp32_as_per_row_bf16(tiny_fp32):
    """bf16 autocast: the packed rows' log-probs are no farther from the fp32 ones than the per-row rows'
    (each within 2x the other's error, plus a bf16 step), the gradient direction the same."""
    prompts, comps = _random_groups(tiny_fp32.config.vocab_size, seed=1)
    rows = list(range(len(comps)))
    mb = pad_completions(rows, prompts, comps, torch.zeros(len(rows)), 0, 1.0, shared_prefix=True)
    ref, _, ref_grads = _logprobs_and_grads(tiny_fp32, mb, packed=False)
    row_lp, _, row_grads = _logprobs_and_grads(tiny_fp32, mb, packed=False, dtype=torch.bfloat16)
    lp, _, grads = _logprobs_and_grads(tiny_fp32, mb, packed=True, dtype=torch.bfloat16)
    row_err, err = (row_lp - ref).abs().mean(), (lp - ref).abs().mean()
    step = 2.0**-8 * ref.abs().mean()  # one bf16 rounding of a log-prob's size
    assert err <= 2 * row_err + step and row_err <= 2 * err + step, (float(err), float(row_err))

    def cosine(a, b):
        flat_a, flat_b = torch.cat([a[n].flatten() for n in a]), torch.cat([b[n].flatten() for n in a])
        return float(flat_a @ flat_b / (flat_a.norm() * flat_b.norm()))

    assert cosine(ref_grads, grads) > 0.999 and cosine(ref_grads, row_grads) > 0.999


def test_an_attention_that_cannot_take_the_mask_is_named(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_path, dtype=torch.float32, attn_implementation="sdpa"
    )
    assert shared_prefix_problem(model) is None
    model.config._attn_implementation = "flash_attention_2"
    assert "flash_attention_2" in shared_prefix_problem(
        model
    ) and "shared_prefix: false" in shared_prefix_problem(model)
    model.config._attn_implementation = "sdpa"
    model.config.sliding_window, model.config.use_sliding_window = 64, True
    assert "sliding-window" in shared_prefix_problem(model)


def test_the_module_warns_and_runs_per_row_where_the_model_cannot_take_the_mask(tiny_model_path):
    module = ParityRewardModule(model="tiny-llama", precision="float32", shared_prefix=True)
    module.configure_model()
    assert module.packed_forward() and module.policy.config._attn_implementation == prefix_attention.NAME
    module.policy.config._attn_implementation = "flash_attention_2"
    module._packs_policy = None
    with pytest.warns(UserWarning, match="shared_prefix is off for this model.*flash_attention_2"):
        assert not module.packed_forward()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once per model
        assert not module.packed_forward()


# ---- fits: the same update as the per-row layout, through the real engine ---------------------------------


CASES = {
    # filtering, KL on every sampled completion (dropped rows at advantage 0), TIS, gradient checkpointing
    # and LM-head chunks smaller than a micro-batch
    "dash, kl sampled, tis, checkpointing, chunks": dict(
        kl_coef=0.1, kl_over="sampled", tis_cap=2.0, gradient_checkpointing=True, logprob_chunk_tokens=8
    ),
    # PPO mini-batches (two slices, two optimizer steps), KL on the kept, LoRA (its reference: adapters off)
    "mini, kl kept, lora": dict(
        update="mini", ppo_mini_batches=2, kl_coef=0.1, kl_over="kept", lora={"r": 4, "alpha": 8}
    ),
}


def module_steps(knobs: dict) -> int:
    return knobs.get("ppo_mini_batches", 1) if knobs.get("update") == "mini" else 1


def _fit_once(engine, shared_prefix: bool, knobs: dict):
    module = ParityRewardModule(
        model="tiny-llama", lr=1e-3, precision="float32", seed=0, max_grad_norm=None, shared_prefix=shared_prefix,
        **knobs,
    )  # fmt: skip
    data = RolloutDataModule(
        train=ProblemSource(source="arithmetic", difficulty="add1", num_problems=16),
        prompts_per_rollout=4,
        group_size=4,
        micro_batch_size=6,  # groups of 4: some split across micro-batches
        filter_threshold=0.1,
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=12),
        max_prompt_tokens=64,
        engine=EngineConfig(kind="vllm", dtype="float32"),
    )
    stats, grads = [], []

    class Record(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.append(
                {n: p.grad.clone() for n, p in pl_module.policy.named_parameters() if p.grad is not None}
            )

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            stats.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})

    torch.manual_seed(0)  # the in-process engine samples from torch's generator: the same rollout twice
    fit(module, data, engine=engine, max_steps=module.steps_per_rollout, callbacks=[Record()])
    # packed rows run the split attention (installed over SDPA); per-row runs keep SDPA
    assert (module.policy.config._attn_implementation == prefix_attention.NAME) == shared_prefix
    return module.last_rollout, grads, stats


@pytest.mark.parametrize("case", list(CASES))
def test_a_shared_prefix_fit_takes_the_per_row_fits_step(tiny_engine, tiny_model_path, case):
    from support import restore_engine_weights

    knobs = CASES[case]
    try:
        row_rollout, row_grads, row_stats = _fit_once(tiny_engine, False, knobs)
        restore_engine_weights(tiny_engine, tiny_model_path)
        rollout, grads, stats = _fit_once(tiny_engine, True, knobs)
    finally:
        restore_engine_weights(tiny_engine, tiny_model_path)
    # the same rollout (sampled from the same initial weights), cut into whole groups, packed
    assert [c.token_ids for c in rollout.completions] == [c.token_ids for c in row_rollout.completions]
    assert all(mb.packed is not None for mb in rollout.micro_batches)
    assert all(mb.packed is None for mb in row_rollout.micro_batches)
    assert sum(mb.num_tokens for mb in rollout.micro_batches) < sum(
        mb.num_tokens for mb in row_rollout.micro_batches
    )
    # every optimizer step's gradient, to float rounding. The first step's at fp32's level; a later step
    # (mini's second slice) starts from weights Adam's sign-like first step moved apart where a gradient
    # was ~0 (a 1e-9 difference on a 1e-8 gradient is a 5% different step there), so 1e-3
    assert len(grads) == len(row_grads) == module_steps(knobs)
    for step, (a, b) in enumerate(zip(row_grads, grads, strict=True)):
        assert set(a) == set(b) and sum(float(g.abs().max()) > 0 for g in a.values()) >= len(a) // 2
        assert _worst_grad(a, b) < (1e-5 if step == 0 else 1e-3), step
    for key in ("train/loss", "train/kl", "train/grad_norm", "train/entropy"):
        for a, b in zip(row_stats, stats, strict=True):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-7), key
    # the engine parity gap stays at its fp32 level (~1e-7 nats on the tiny model)
    assert all(s["train/engine_logprob_gap"] < 1e-4 for s in stats)
