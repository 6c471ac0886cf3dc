"""LoRA's push of the MLP's fused pair and the refusal of adapters that do not fit their config.

vLLM fuses ``gate_proj`` and ``up_proj`` into one parameter and rebuilds it from the parts a push sends, so
adapting ``up_proj`` alone must send ``gate_proj``'s (unchanged) base weight with it; the session engine
then serves the adapted policy. A checkpoint whose adapters do not match its ``model.lora`` is refused with
the names that are missing or unexpected."""

from __future__ import annotations

import pytest
import torch
from support import restore_engine_weights, sequence_logprobs

from lit_dash import lora
from lit_dash.errors import ConfigError
from lit_dash.module import DashModule

SPEC = {"r": 4, "alpha": 8, "dropout": 0.0}


def _adapted(targets: list[str]) -> DashModule:
    module = DashModule(model="tiny-llama", lora={**SPEC, "target_modules": targets}, precision="float32")
    module.configure_model()
    torch.manual_seed(0)
    with torch.no_grad():  # peft starts B at 0 (a no-op adapter): a random B makes base + adapter differ
        for name, p in module.policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return module


def test_up_proj_alone_sends_its_gate_sibling_and_the_engine_serves_the_adapted_mlp(
    tiny_engine, tiny_model_path
):
    module = _adapted(["up_proj"])
    pushed = dict(lora.merged_adapted_weights(module.policy))
    layers = module.policy.base_model.model.model.layers
    assert sorted(pushed) == [
        f"model.layers.{i}.mlp.{name}_proj.weight" for i in range(2) for name in ("gate", "up")
    ]
    for i, layer in enumerate(layers):
        up, gate = layer.mlp.up_proj, layer.mlp.gate_proj
        by_hand = up.base_layer.weight + 2.0 * up.lora_B["default"].weight @ up.lora_A["default"].weight
        torch.testing.assert_close(pushed[f"model.layers.{i}.mlp.up_proj.weight"], by_hand, rtol=0, atol=1e-6)
        assert torch.equal(pushed[f"model.layers.{i}.mlp.gate_proj.weight"], gate.weight)  # base, unchanged
    # control: down_proj is fused with nothing, so it goes alone
    alone = dict(lora.merged_adapted_weights(_adapted(["down_proj"]).policy))
    assert sorted(alone) == [f"model.layers.{i}.mlp.down_proj.weight" for i in range(2)]

    ids = tiny_engine.tokenizer("What is 3 + 4? The answer is 7.")["input_ids"]
    policy = sequence_logprobs(module.policy, ids)
    before = torch.tensor(tiny_engine.sequence_logprobs([ids])[0])
    try:
        tiny_engine.load_weights(pushed.items())
        served = torch.tensor(tiny_engine.sequence_logprobs([ids])[0])
    finally:
        restore_engine_weights(tiny_engine, tiny_model_path)
    torch.testing.assert_close(served, policy, atol=1e-4, rtol=0)  # fp32 on both sides
    gap = float((before - policy).abs().max())
    assert gap > 1e-3, f"the base weights would pass too (gap {gap:.1e}): the adapters change nothing here"


def _checkpoint(module: DashModule, lora_spec: dict) -> dict:
    """A LoRA checkpoint as on_save_checkpoint writes it: the adapters alone, under ``policy.``."""
    trainable = {f"policy.{n}" for n, p in module.policy.named_parameters() if p.requires_grad}
    state = {k: v for k, v in module.state_dict().items() if k in trainable}
    return {"state_dict": state, "hyper_parameters": {"model": "tiny-llama", "lora": lora_spec}}


def test_adapters_that_do_not_fit_their_lora_config_are_refused():
    module = _adapted(["q_proj"])
    spec = {**SPEC, "target_modules": ["q_proj"]}
    layer0 = "base_model.model.model.layers.0.self_attn"
    with pytest.raises(
        ConfigError,
        match=r"the checkpoint's adapters do not fit model\.lora \{.*'target_modules': \['q_proj', 'v_proj'\]\}: "
        rf"missing \['{layer0}\.v_proj\.lora_A\.default\.weight', .*\], unexpected \[\]",
    ):
        lora.peft_model_from_checkpoint(_checkpoint(module, {**spec, "target_modules": ["q_proj", "v_proj"]}))
    with pytest.raises(  # r 8 in the config, 4 in the adapters: the same names, other shapes
        ConfigError,
        match=r"missing \[\], unexpected \[\], other shapes \(checkpoint vs config\) "
        rf"\['{layer0}\.q_proj\.lora_A\.default\.weight \(4, 128\) vs \(8, 128\)', .*\]: is r the run's\?",
    ):
        lora.peft_model_from_checkpoint(_checkpoint(module, {**spec, "r": 8}))
    extra = _checkpoint(module, spec)
    extra["state_dict"]["policy.base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight"] = (
        torch.ones(1)
    )
    with pytest.raises(
        ConfigError, match=r"missing \[\], unexpected \['.*up_proj\.lora_A\.default\.weight'\]"
    ):
        lora.peft_model_from_checkpoint(extra)
    with pytest.raises(ConfigError, match="the checkpoint's model has no lora hyper-parameter"):
        lora.peft_model_from_checkpoint({"state_dict": {}, "hyper_parameters": {"model": "tiny-llama"}})
    # control: the same adapters with their own config load, and the model computes the trained policy
    loaded = lora.peft_model_from_checkpoint(_checkpoint(module, spec))
    ids = [1, 17, 230, 5, 999, 42, 7, 3000]
    torch.testing.assert_close(
        sequence_logprobs(loaded, ids), sequence_logprobs(module.policy, ids), rtol=0, atol=1e-6
    )
