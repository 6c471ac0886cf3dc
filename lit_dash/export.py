"""The trained policy as a plain transformers folder that vLLM and ``AutoModelForCausalLM`` load directly:
safetensors weights (the training dtype, or a chosen one), ``config.json``, ``generation_config.json``, the
tokenizer and its chat template.

One mechanism serves three callers: the :class:`~lit_dash.callbacks.ExportModel` callback at the end of
fit, ``lit-dash export --ckpt_path X --out DIR`` on any checkpoint, and ``scripts/independent_check.py``.

A checkpoint can be a Lightning ``.ckpt`` file, or the folder an FSDP run writes with
``state_dict_type: sharded`` (consolidated here with Lightning's own loader,
``lightning.fabric.utilities.load._load_distributed_checkpoint``). A DeepSpeed checkpoint folder is
refused with the command that converts it first.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lit_dash.errors import InputError

EXPORT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
POLICY_PREFIX = "policy."


def export_dtype(name: str | None) -> torch.dtype | None:
    """``None`` keeps the training dtype (the policy's master weights); else float32, bfloat16 or float16."""
    if name is None or name == "auto":
        return None
    if name not in EXPORT_DTYPES:
        raise InputError(f"export dtype must be auto, {', '.join(EXPORT_DTYPES)}; got {name!r}")
    return EXPORT_DTYPES[name]


def policy_state(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The ``policy.*`` weights of a LightningModule state dict, names as transformers has them."""
    state = {k.removeprefix(POLICY_PREFIX): v for k, v in state_dict.items() if k.startswith(POLICY_PREFIX)}
    if not state:
        raise InputError(
            f"the checkpoint has no policy.* weights (first keys: {list(state_dict)[:5]}): "
            "is it a lit_dash (DashModule / SftModule) checkpoint?"
        )
    return state


def save_policy(
    model: torch.nn.Module,
    out: str | os.PathLike,
    tokenizer_source: str,
    dtype: torch.dtype | None = None,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write ``model`` (or ``state_dict`` in its architecture) as a transformers folder at ``out``.

    ``dtype`` None keeps the weights' own dtype. The tokenizer (with its chat template) comes from
    ``tokenizer_source``, a model folder or hub id. The model's generation config is written as it is,
    except that ``use_cache`` (turned off for training) is turned back on in ``config.json``.
    """
    from transformers import AutoTokenizer

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = state_dict if state_dict is not None else model.state_dict()
    if dtype is not None:
        state = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    saved_dtype = next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)
    config = model.config
    use_cache = getattr(config, "use_cache", None)
    try:
        config.use_cache = True
        model.save_pretrained(out, state_dict=state)  # safetensors
    finally:
        config.use_cache = use_cache
    _write_config_dtype(out, saved_dtype)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    tokenizer.save_pretrained(out)
    if getattr(tokenizer, "chat_template", None) and not _has_chat_template(out):
        raise RuntimeError(f"the tokenizer's chat template was not written to {out}")
    return out


def _write_config_dtype(folder: Path, dtype: torch.dtype) -> None:
    """``config.json`` says what the safetensors hold (save_pretrained writes the in-memory model's dtype,
    fp32 when a cast state dict was saved); vLLM's and transformers' ``dtype="auto"`` read it."""
    import json

    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["dtype"] = str(dtype).removeprefix("torch.")
    config.pop("torch_dtype", None)
    path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _has_chat_template(folder: Path) -> bool:
    import json

    if (folder / "chat_template.jinja").exists() or (folder / "chat_template.json").exists():
        return True
    config = folder / "tokenizer_config.json"
    return config.exists() and "chat_template" in json.loads(config.read_text())


# ---- checkpoints --------------------------------------------------------------------------------------


def load_checkpoint(path: str | os.PathLike) -> dict:
    """A Lightning checkpoint as a dict with ``state_dict``: a ``.ckpt`` file, or an FSDP sharded folder
    (consolidated in memory with Lightning's loader)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist")
    if path.is_file():
        return torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    if (path / "checkpoint").is_dir() or any(path.glob("*/mp_rank_*_model_states.pt")):
        raise InputError(
            f"{path} is a DeepSpeed checkpoint folder: convert it to one file first with "
            f"`python -m lightning.pytorch.utilities.deepspeed {path} {path}.ckpt` "
            "(lightning's convert_zero_checkpoint_to_fp32_state_dict), then export that file"
        )
    if (path / ".metadata").exists():  # torch.distributed.checkpoint: an FSDP run with sharded state dicts
        from lightning.fabric.utilities.load import _load_distributed_checkpoint
        from lightning.pytorch.utilities.consolidate_checkpoint import _format_checkpoint

        return _format_checkpoint(_load_distributed_checkpoint(path))
    raise InputError(
        f"{path} is a folder but neither a sharded (FSDP) checkpoint (no .metadata) nor a DeepSpeed one: "
        "pass a .ckpt file"
    )


def checkpoint_model_name(ckpt: dict, override: str | None = None, config: str | None = None) -> str:
    """The base model the checkpoint was trained from: ``override``, else the checkpoint's hyper-parameters,
    else the ``model.init_args.model`` of ``config`` (a lit-dash YAML)."""
    if override:
        return override
    name = (ckpt.get("hyper_parameters") or {}).get("model")
    if not name and config:
        import yaml

        model = (yaml.safe_load(Path(config).read_text()) or {}).get("model") or {}
        name = (model.get("init_args") or model).get("model")
    if not name:
        raise InputError("the checkpoint names no base model: pass --model NAME or --config CONFIG.yaml")
    return name


def export_checkpoint(
    ckpt_path: str | os.PathLike,
    out: str | os.PathLike,
    dtype: str | None = None,
    model: str | None = None,
    config: str | None = None,
) -> Path:
    """The checkpoint's policy as a transformers folder at ``out`` (see :func:`save_policy`).

    The architecture, generation config and tokenizer come from the base model; the weights all come from
    the checkpoint (every weight of the base must be there, tied ones aside)."""
    from transformers import AutoModelForCausalLM

    from lit_dash.models import resolve_model

    target = export_dtype(dtype)  # bad dtype: fail before loading anything
    ckpt = load_checkpoint(ckpt_path)
    hparams = ckpt.get("hyper_parameters") or {}
    if hparams.get("lora"):  # an adapter-only checkpoint: the base with its adapters merged in
        from lit_dash.lora import merged_model_from_checkpoint

        merged = merged_model_from_checkpoint(ckpt)
        base = resolve_model(checkpoint_model_name(ckpt, model, config), hparams.get("model_cache"))
        return save_policy(merged, out, base, dtype=target)
    state = policy_state(ckpt["state_dict"])
    base = resolve_model(checkpoint_model_name(ckpt, model, config), hparams.get("model_cache"))
    policy = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    result = policy.load_state_dict(state, strict=False)
    tied = policy.config.tie_word_embeddings
    missing = [k for k in result.missing_keys if k != "lm_head.weight" or not tied]
    if missing or result.unexpected_keys:
        raise InputError(
            f"checkpoint {ckpt_path} and base model {base} disagree: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}: pass the run's base model with --model"
        )
    return save_policy(policy, out, base, dtype=target if target is not None else _state_dtype(state))


def export_adapter(ckpt_path: str | os.PathLike, out: str | os.PathLike) -> Path:
    """A LoRA checkpoint's adapter alone, in PEFT's format, at ``out`` (see :func:`lit_dash.lora.save_adapter`)."""
    from lit_dash.lora import peft_model_from_checkpoint, save_adapter

    ckpt = load_checkpoint(ckpt_path)
    if not (ckpt.get("hyper_parameters") or {}).get("lora"):
        raise InputError(f"{ckpt_path} is not a LoRA run's checkpoint: it has no adapter to export alone")
    return save_adapter(peft_model_from_checkpoint(ckpt), out)


def _state_dtype(state: dict[str, torch.Tensor]) -> torch.dtype:
    return next((v.dtype for v in state.values() if v.is_floating_point()), torch.float32)


def build_parser():
    """The ``lit-dash export`` command line."""
    import argparse

    ap = argparse.ArgumentParser(
        prog="lit-dash export",
        description="Write a checkpoint's policy as a transformers folder (safetensors, tokenizer, chat "
        "template, generation config) that vLLM and AutoModelForCausalLM load.",
    )
    ap.add_argument("--ckpt_path", required=True, help="a .ckpt file or an FSDP sharded checkpoint folder")
    ap.add_argument("--out", required=True, help="the folder to write")
    ap.add_argument("--dtype", default="auto", choices=["auto", *EXPORT_DTYPES], help="auto: as trained")
    ap.add_argument("--model", help="the base model (default: the checkpoint's model)")
    ap.add_argument("--config", help="a lit-dash config naming the base model (model.init_args.model)")
    ap.add_argument(
        "--adapter_out", help="LoRA runs: also write the adapter alone, in PEFT's format, to this folder"
    )
    return ap


def main(argv: list[str] | None = None) -> Path:
    """``lit-dash export``: a checkpoint's policy as a transformers folder."""
    args = build_parser().parse_args(argv)
    if args.adapter_out:  # a checkpoint without adapters fails here, before the merged export
        adapter = export_adapter(args.ckpt_path, args.adapter_out)
        print(f"[lit_dash] wrote the adapter of {args.ckpt_path} (PEFT format) to {adapter}")
    out = export_checkpoint(args.ckpt_path, args.out, args.dtype, args.model, args.config)
    print(f"[lit_dash] exported {args.ckpt_path} to {out}")
    return out
