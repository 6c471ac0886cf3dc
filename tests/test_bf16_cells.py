"""bf16 cells (lit_dash/training/bf16_cells.py): weights that start on the bf16 grid stall under
round-to-nearest; moved inside their cells they follow small updates, and their bf16 values are kept."""

from __future__ import annotations

import torch
from transformers import AutoModelForCausalLM

from lit_dash.module import DashModule
from lit_dash.training.bf16_cells import _cell_offsets, dither_within_bf16_cells, on_bf16_grid

BF16 = torch.bfloat16


def _on_grid(n: int, seed: int = 0) -> torch.Tensor:
    """n weights like a small model's (N(0, 0.05)), stored in bf16 and loaded as float32."""
    return (torch.randn(n, generator=torch.Generator().manual_seed(seed)) * 0.05).to(BF16).float()


def test_cell_offsets_stay_inside_each_cell_by_hand():
    # 1.0 is a power of two: the next bf16 value up is 1 + 2^-7, down 1 - 2^-8; 1.5: +-2^-7; 0 stays 0
    w = torch.tensor([1.0, -1.0, 1.5, 0.0, 2.0**-10])
    for seed in range(20):
        off = _cell_offsets(w, torch.Generator().manual_seed(seed))
        assert off[3] == 0.0
        assert -0.5 * 2**-8 < off[0] < 0.5 * 2**-7 and -0.5 * 2**-7 < off[1] < 0.5 * 2**-8
        assert -0.5 * 2**-7 < off[2] < 0.5 * 2**-7
        assert abs(off[4]) < 0.5 * 2**-17  # 2^-10 has 2^-17 to its neighbours (2^-18 below)
        assert torch.equal((w + off).to(BF16), w.to(BF16))


def test_on_grid_weights_stall_and_dithered_ones_follow_a_small_update():
    """Round-to-nearest of weights moved by k x 3e-5 (an AdamW step at lr 3e-5): from the grid the bf16
    copy moves by a fraction of that (the control), from inside the cells by all of it on average."""
    w = _on_grid(400_000)
    dithered = w + _cell_offsets(w, torch.Generator().manual_seed(1))
    assert torch.equal(dithered.to(BF16), w.to(BF16)) and not on_bf16_grid(dithered)
    for steps in (1, 4):
        move = steps * 3e-5
        stalled = float(((w + move).to(BF16).float() - w).mean())
        followed = float(((dithered + move).to(BF16).float() - w).mean())
        assert stalled < 0.6 * move, (steps, stalled)  # measured: 0.13 of it at 1 step, 0.48 at 4
        assert abs(followed - move) < 0.03 * move, (steps, followed)  # sampling noise: about 0.006


def test_a_model_stored_in_bf16_is_dithered_in_bf16_training_only(tiny_model_path, tmp_path):
    """The tiny model's weights rounded onto the bf16 grid and saved: in bf16 training the policy and the
    reference move inside their cells alike and keep their bf16 values; in fp32 nothing moves."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(BF16).float())
    model.save_pretrained(tmp_path / "on_grid")
    stored = {n: p.detach().clone() for n, p in model.named_parameters()}

    bf16 = DashModule(model=str(tmp_path / "on_grid"), precision="bfloat16", kl_coef=0.04, seed=3)
    bf16.configure_model()
    for name, p in bf16.policy.named_parameters():
        assert torch.equal(p.detach().to(BF16), stored[name].to(BF16)), name
        assert not torch.equal(p.detach(), stored[name]), f"{name} did not move"
    reference = dict(bf16.reference.named_parameters())
    assert all(torch.equal(p, reference[n]) for n, p in bf16.policy.named_parameters())

    fp32 = DashModule(model=str(tmp_path / "on_grid"), precision="float32", seed=3)
    fp32.configure_model()  # outside a Trainer there is no engine: fp32 means no bf16 copy
    assert all(torch.equal(p.detach(), stored[n]) for n, p in fp32.policy.named_parameters())
    forced = DashModule(model=str(tmp_path / "on_grid"), precision="float32", bf16_dither=True, seed=3)
    forced.configure_model()  # the same seed: the same offsets as the bf16 run
    assert all(
        torch.equal(p, dict(bf16.policy.named_parameters())[n]) for n, p in forced.policy.named_parameters()
    )


def test_weights_off_the_grid_are_left_alone(tiny_model_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    with torch.no_grad():  # the tiny model is stored on the bf16 grid too: take two parameters off it
        for p in list(model.parameters())[:2]:
            p.add_(torch.full_like(p, 1e-7) * torch.sign(p))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    off_grid = [n for n, p in before.items() if not on_bf16_grid(p)]
    moved = dither_within_bf16_cells(model, seed=0)
    assert off_grid and moved == len(before) - len(off_grid)
    assert all(torch.equal(dict(model.named_parameters())[n], before[n]) for n in off_grid)


def test_a_bf16_fit_moves_the_bf16_weights_only_from_inside_the_cells(tiny_engine_bf16, tiny_model_path):
    """One bf16 step at lr 3e-5 on the tiny model (stored on the bf16 grid), through the real engine. AdamW's
    first step moves each weight by lr = 3e-5; a weight with |w| >= 2^-6 has bf16 neighbours at least 2^-13
    = 1.2e-4 away, so from the grid its bf16 value cannot change (the stall, the control), while from a
    uniform place in its cell it changes with probability lr / spacing, a quarter at most."""
    from fitting import fit
    from tiny_reward import ParityRewardModule

    from lit_dash.data.datamodule import EngineConfig, ProblemSource, RolloutDataModule
    from lit_dash.engines import SamplingConfig

    initial = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    start = {n: p.detach().to(BF16) for n, p in initial.named_parameters()}
    changed = {}
    try:
        for dither in (False, True):
            module = ParityRewardModule(
                model="tiny-llama", lr=3e-5, precision="bfloat16", bf16_dither=dither, seed=0,
                lr_schedule="constant", max_grad_norm=None, parity_check="off",
            )  # fmt: skip
            data = RolloutDataModule(
                train=ProblemSource(source="arithmetic", difficulty="add1", num_problems=8),
                prompts_per_rollout=4, group_size=4, micro_batch_size=8, filter_threshold=None,
                sampling=SamplingConfig(temperature=1.0, max_new_tokens=8), max_prompt_tokens=64,
                engine=EngineConfig(kind="vllm", dtype="bfloat16"),
            )  # fmt: skip
            fit(module, data, engine=tiny_engine_bf16, max_steps=1)
            weights = dict(module.policy.named_parameters())
            large = {n: start[n].float().abs() >= 2.0**-6 for n in start}
            moved = sum(int(((weights[n].detach().to(BF16) != start[n]) & large[n]).sum()) for n in start)
            changed[dither] = moved / sum(int(m.sum()) for m in large.values())
    finally:
        tiny_engine_bf16.load_weights(initial.state_dict().items())
    print(f"[bf16 cells] share of the |w| >= 2^-6 weights whose bf16 value one step changed: {changed}")
    assert changed[False] == 0.0, changed
    assert 0.05 < changed[True] <= 0.25, changed
