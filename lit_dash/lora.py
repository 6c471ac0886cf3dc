"""LoRA through ``peft``: the policy's adapters, the frozen base as the KL reference, and what leaves the
trainer (merged weights for the engine and for export, the adapter alone for checkpoints).

The engine serves base + adapter as merged weights (``W + scale * B @ A``), pushed under the base
model's names for the adapted modules only: the trainer's model is never merged, so training keeps
going through the adapters. vLLM's CPU backend has LoRA kernels too (``enable_lora`` + ``LoRARequest``),
but an adapter there is loaded from a folder under a new id each step and the engine must be started
for it; the merged push needs neither, and keeps one code path for every engine.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping
from typing import Any

import torch

from lit_dash.errors import ConfigError

LORA_KEYS = {"r", "alpha", "dropout", "target_modules"}
DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Projections vLLM fuses into one parameter (qkv_proj, gate_up_proj). Its layer-wise reload rebuilds a
# fused parameter from whatever parts arrive, and leaves the parts that did not arrive uninitialised;
# so a push that changes one part sends its siblings (base weights, unchanged) with it.
FUSED_GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
PEFT_PREFIX = "base_model.model."


def lora_config(spec: Mapping[str, Any]):
    """``model.lora`` (r, alpha, dropout, target_modules) as a ``peft.LoraConfig``; a bad value is a
    ConfigError naming the key, before any model is loaded."""
    from peft import LoraConfig

    if not isinstance(spec, Mapping):
        raise ConfigError(
            f"model.lora must be a mapping (r, alpha, dropout, target_modules) or null, got {spec!r}"
        )
    unknown = set(spec) - LORA_KEYS
    errors = [f"unknown keys {sorted(unknown)} (known: {sorted(LORA_KEYS)})"] if unknown else []
    r = spec.get("r", 16)
    alpha = spec.get("alpha", 2 * r if isinstance(r, int) else 32)
    dropout = spec.get("dropout", 0.0)
    targets = spec.get("target_modules", list(DEFAULT_TARGETS))
    if not isinstance(r, int) or isinstance(r, bool) or r < 1:
        errors.append(f"r (the adapter rank) must be an integer >= 1, got {r!r}")
    if not isinstance(alpha, (int, float)) or not alpha > 0:
        errors.append(f"alpha must be > 0 (the update is scaled by alpha / r), got {alpha!r}")
    if not isinstance(dropout, (int, float)) or not 0 <= dropout < 1:
        errors.append(f"dropout must be in [0, 1), got {dropout!r}")
    if isinstance(targets, str):
        targets = [targets]
    if not targets or not all(isinstance(t, str) and t for t in targets):
        errors.append(
            f"target_modules must be a non-empty list of module names (e.g. q_proj), got {targets!r}"
        )
    if errors:
        raise ConfigError("model.lora: " + "; ".join(errors))
    return LoraConfig(
        r=r,
        lora_alpha=alpha,
        lora_dropout=float(dropout),
        target_modules=list(targets),
        bias="none",
        task_type="CAUSAL_LM",
    )


def apply_lora(model: torch.nn.Module, spec: Mapping[str, Any]) -> torch.nn.Module:
    """``model`` wrapped by peft with fresh adapters (B = 0, so it computes exactly the base model at
    first); every base parameter frozen."""
    from peft import get_peft_model

    config = lora_config(spec)
    try:
        return get_peft_model(model, config)
    except ValueError as err:  # peft: "Target modules {...} not found in the base model"
        names = sorted(
            {n.rsplit(".", 1)[-1] for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
        )
        raise ConfigError(
            f"model.lora.target_modules {list(config.target_modules)}: {err}. "
            f"The model's linear layers are named: {names}"
        ) from err


def is_lora(model: torch.nn.Module | None) -> bool:
    from peft import PeftModel

    return isinstance(model, PeftModel)


def _lora_layers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def _base_name(peft_name: str) -> str:
    """peft's module name as the base model names it (``base_model.model.`` and ``.base_layer`` gone)."""
    return peft_name.removeprefix(PEFT_PREFIX).replace(".base_layer", "")


def _merged_weight(layer: torch.nn.Module) -> torch.Tensor:
    """The layer's ``W + scale * B @ A`` over its active adapters (peft's own ``get_delta_weight``), as a
    new tensor: the layer itself is not merged."""
    weight = layer.get_base_layer().weight.detach()
    if getattr(layer, "merged", False):  # someone merged it in place: the base weight is already W + dW
        return weight.clone()
    merged = weight.clone()
    for adapter in layer.active_adapters:
        if adapter in layer.lora_A:
            merged += layer.get_delta_weight(adapter).detach().to(merged.dtype)
    return merged


@torch.no_grad()
def merged_adapted_weights(model: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(base name, merged weight) of every adapted module, plus the unchanged base weights of the
    siblings of a fused projection (:data:`FUSED_GROUPS`); nothing else, since nothing else changes."""
    layers = dict(_lora_layers(model))
    adapted = {_base_name(n): layer for n, layer in layers.items()}
    modules = dict(model.named_modules())
    sent = set()
    for name in adapted:
        parent, _, leaf = name.rpartition(".")
        group = next((g for g in FUSED_GROUPS if leaf in g), (leaf,))
        for member in group:
            full = f"{parent}.{member}" if parent else member
            if full in sent:
                continue
            sent.add(full)
            if full in adapted:
                yield f"{full}.weight", _merged_weight(adapted[full])
            elif (module := modules.get(PEFT_PREFIX + full)) is not None:
                yield f"{full}.weight", module.weight.detach()


@torch.no_grad()
def merged_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The whole model's weights under the base model's names, the adapted ones merged (for export)."""
    merged = dict(merged_adapted_weights(model))
    state = {}
    for name, tensor in model.state_dict().items():
        if ".lora_" in name:
            continue
        name = _base_name(name)
        state[name] = merged.get(name, tensor)
    return state


def merged_model(model: torch.nn.Module) -> torch.nn.Module:
    """A plain transformers model with the adapters merged in (peft's ``merge_and_unload`` on a copy:
    the trainer's model stays unmerged). Costs one model's memory while it lives."""
    return copy.deepcopy(model).merge_and_unload()


def adapter_state(state_dict: Mapping[str, torch.Tensor], trainable: set[str]) -> dict[str, torch.Tensor]:
    """The entries of a module state dict that are trainable parameters (the adapters): a checkpoint's
    weights, the frozen base being reloadable from the model on disk."""
    return {k: v for k, v in state_dict.items() if k in trainable}


def parameter_bytes(model: torch.nn.Module, trainable: bool | None = None) -> int:
    """Bytes of ``model``'s parameters (all, or only the trainable / frozen ones)."""
    return sum(
        p.numel() * p.element_size()
        for p in model.parameters()
        if trainable is None or p.requires_grad == trainable
    )


def peft_model_from_checkpoint(checkpoint: Mapping[str, Any]) -> torch.nn.Module:
    """The peft model (base + adapters, unmerged) of an adapter-only DashModule checkpoint (a
    ``torch.load``-ed ``.ckpt``): the base from ``hyper_parameters.model``, the adapters from
    ``state_dict``."""
    from transformers import AutoModelForCausalLM

    from lit_dash.models import resolve_model

    hparams = checkpoint.get("hyper_parameters", {})
    if hparams.get("lora") is None:
        raise ConfigError(
            "the checkpoint's model has no lora hyper-parameter: it is not a LoRA run's checkpoint"
        )
    base = AutoModelForCausalLM.from_pretrained(
        resolve_model(hparams["model"], hparams.get("model_cache")), dtype=torch.float32
    )
    policy = apply_lora(base, hparams["lora"])
    adapters = {k.removeprefix("policy."): v for k, v in checkpoint["state_dict"].items()}
    own = policy.state_dict()
    missing = {n for n, p in policy.named_parameters() if p.requires_grad} - set(adapters)
    unexpected = set(adapters) - set(own)
    # another rank: the same names, other shapes (torch's strict load would say only "size mismatch")
    reshaped = sorted(k for k in set(adapters) & set(own) if adapters[k].shape != own[k].shape)
    if missing or unexpected or reshaped:
        shapes = [f"{k} {tuple(adapters[k].shape)} vs {tuple(own[k].shape)}" for k in reshaped[:2]]
        raise ConfigError(
            f"the checkpoint's adapters do not fit model.lora {hparams['lora']}: missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}"
            + (f", other shapes (checkpoint vs config) {shapes}: is r the run's?" if reshaped else "")
        )
    policy.load_state_dict(adapters, strict=False)
    return policy


def merged_model_from_checkpoint(checkpoint: Mapping[str, Any]) -> torch.nn.Module:
    """The plain merged model of an adapter-only DashModule checkpoint. For ``lit-dash export --ckpt_path``
    on a LoRA run."""
    return peft_model_from_checkpoint(checkpoint).merge_and_unload()


def save_adapter(model: torch.nn.Module, out):
    """The adapter alone in PEFT's format (``adapter_config.json`` naming the base model's folder,
    ``adapter_model.safetensors``), which ``peft.PeftModel.from_pretrained(base, out)`` and vLLM's
    ``LoRARequest`` load."""
    from pathlib import Path

    if not is_lora(model):
        raise ConfigError("the adapter alone can only be exported from a LoRA run (model.lora is null)")
    out = Path(out)
    model.save_pretrained(out)
    return out
