"""``lit-dash export``'s refusals and the DeepSpeed ones, each with the message that says what to do and a
control the same code accepts. Hand-made checkpoints of the tiny model; no fit, no engine."""

from __future__ import annotations

import pytest
import torch
import yaml
from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from lit_dash.callbacks import ExportModel
from lit_dash.errors import ConfigError, InputError
from lit_dash.export import (
    checkpoint_model_name,
    export_checkpoint,
    export_dtype,
    load_checkpoint,
    main,
    policy_state,
)
from lit_dash.training.optim import check_clipping_strategy


def _tiny_checkpoint(tiny_model_path, path, drop: str | None = None, shift: float = 1.0) -> dict:
    """A DashModule-style checkpoint of the tiny model, every weight moved by ``shift``, one dropped."""
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    state = {f"policy.{k}": v + shift for k, v in base.state_dict().items() if k != drop}
    torch.save({"state_dict": state, "hyper_parameters": {"model": "tiny-llama"}, "global_step": 2}, path)
    return state


def test_a_bad_export_dtype_is_refused_before_anything_loads(tmp_path):
    message = r"export dtype must be auto, float32, bfloat16, float16; got 'int8'"
    with pytest.raises(InputError, match=message):
        export_dtype("int8")
    with pytest.raises(InputError, match=message):  # the dtype is checked before the (missing) checkpoint
        export_checkpoint(tmp_path / "missing.ckpt", tmp_path / "out", dtype="int8")
    with pytest.raises(InputError, match=message):  # and by the callback at config time
        ExportModel(dtype="int8")
    assert (export_dtype("auto"), export_dtype(None), export_dtype("float16")) == (None, None, torch.float16)


@pytest.mark.parametrize("layout", ["checkpoint_dir", "mp_rank_file"])
def test_a_deepspeed_checkpoint_folder_is_refused_with_the_conversion_command(tmp_path, layout):
    folder = tmp_path / "last.ckpt"
    if layout == "checkpoint_dir":  # what Lightning's DeepSpeedStrategy writes: <ckpt>/checkpoint/...
        (folder / "checkpoint").mkdir(parents=True)
    else:  # a DeepSpeed tag folder: <ckpt>/<tag>/mp_rank_00_model_states.pt
        (folder / "global_step2").mkdir(parents=True)
        (folder / "global_step2" / "mp_rank_00_model_states.pt").write_bytes(b"")
    with pytest.raises(InputError) as refused:
        load_checkpoint(folder)
    assert str(refused.value) == (
        f"{folder} is a DeepSpeed checkpoint folder: convert it to one file first with "
        f"`python -m lightning.pytorch.utilities.deepspeed {folder} {folder}.ckpt` "
        "(lightning's convert_zero_checkpoint_to_fp32_state_dict), then export that file"
    )


def test_a_checkpoint_without_policy_weights_is_refused():
    with pytest.raises(
        InputError,
        match=r"the checkpoint has no policy\.\* weights \(first keys: \['model\.norm\.weight', 'lm_head"
        r"\.weight'\]\): is it a lit_dash \(DashModule / SftModule\) checkpoint\?",
    ):
        policy_state({"model.norm.weight": torch.ones(1), "lm_head.weight": torch.ones(1)})
    control = policy_state({"policy.model.norm.weight": torch.ones(1), "reference.x": torch.zeros(1)})
    assert list(control) == ["model.norm.weight"]  # the prefix goes, the reference stays out


def test_the_base_model_comes_from_the_override_the_checkpoint_or_the_config(tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": {"init_args": {"model": "from-config"}}}))
    with pytest.raises(
        InputError, match=r"the checkpoint names no base model: pass --model NAME or --config CONFIG\.yaml"
    ):
        checkpoint_model_name({"hyper_parameters": {}})
    assert checkpoint_model_name({}, config=str(config)) == "from-config"
    assert (
        checkpoint_model_name({"hyper_parameters": {"model": "from-ckpt"}}, config=str(config)) == "from-ckpt"
    )
    assert checkpoint_model_name({"hyper_parameters": {"model": "from-ckpt"}}, override="mine") == "mine"


def test_a_checkpoint_that_does_not_fit_the_base_model_is_refused_and_one_that_does_is_exported(
    tiny_model_path, tmp_path, capsys
):
    broken = tmp_path / "broken.ckpt"
    _tiny_checkpoint(tiny_model_path, broken, drop="model.norm.weight")
    with pytest.raises(
        InputError,
        match=rf"checkpoint {broken} and base model .+ disagree: missing \['model\.norm\.weight'\], "
        r"unexpected \[\]: pass the run's base model with --model",
    ):
        export_checkpoint(broken, tmp_path / "out")
    assert not (tmp_path / "out").exists(), "refused before anything is written"

    good = tmp_path / "good.ckpt"  # control: the same checkpoint with every weight is exported as it is
    state = _tiny_checkpoint(tiny_model_path, good)
    main(["--ckpt_path", str(good), "--out", str(tmp_path / "good")])
    assert f"exported {good} to {tmp_path / 'good'}" in capsys.readouterr().out
    weights = load_file(tmp_path / "good" / "model.safetensors")
    assert weights.keys() <= {k.removeprefix("policy.") for k in state}
    assert all(torch.equal(weights[k], state[f"policy.{k}"]) for k in weights)


def test_clipping_is_refused_under_deepspeed_only():
    """DeepSpeed is not installed here (and needs an accelerator), so the strategy is an instance made
    without its constructor: the check only asks what kind of strategy it is."""
    deepspeed = DeepSpeedStrategy.__new__(DeepSpeedStrategy)
    with pytest.raises(
        ConfigError,
        match=r"model\.max_grad_norm=1\.0 cannot clip under DeepSpeed: ZeRO keeps the gradients in its own "
        r"partitions and clips them itself \(its gradient_clipping setting\); set model\.max_grad_norm: null",
    ):
        check_clipping_strategy(deepspeed, 1.0)
    check_clipping_strategy(deepspeed, None)  # controls: no clipping asked for, or another strategy
    check_clipping_strategy(DDPStrategy(), 1.0)
