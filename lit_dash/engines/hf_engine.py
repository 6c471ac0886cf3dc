"""The transformers ``generate`` fallback engine: same interface, no vLLM.

Slow (about 8x slower than vLLM at batch 64 on a CPU), but it runs wherever transformers does, e.g. on
a GPU machine without vLLM. It is a fallback, not the tested main path.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

import torch

from lit_dash.engines.base import Completion, Engine, GenerationResult, SamplingConfig
from lit_dash.hardware import resolve_dtype


class HFEngine(Engine):
    """Generation with ``model.generate`` on its own copy of the weights."""

    def __init__(
        self, model: str, seed: int = 0, dtype: str = "auto", device: str | None = None, batch_size: int = 64
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model, dtype=resolve_dtype(dtype, self.device)).to(
            self.device
        )
        self.model.eval()
        self.dtype = self.model.dtype
        self.batch_size = batch_size
        self._generator = torch.Generator(device="cpu").manual_seed(seed)

    @torch.no_grad()
    def generate(
        self, prompts: list[str], n: int, sampling: SamplingConfig, want_logprobs: bool = False
    ) -> GenerationResult:
        start = time.perf_counter()
        encoded = [self.tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
        flat = [(i, ids) for i, ids in enumerate(encoded) for _ in range(n)]
        eos = self.tokenizer.eos_token_id
        completions: list[Completion] = []
        for chunk_start in range(0, len(flat), self.batch_size):
            chunk = flat[chunk_start : chunk_start + self.batch_size]
            batch = self.tokenizer.pad(
                {"input_ids": [ids for _, ids in chunk]}, padding=True, return_tensors="pt"
            ).to(self.device)
            torch.manual_seed(int(torch.randint(0, 2**31 - 1, (1,), generator=self._generator)))
            kwargs = dict(
                max_new_tokens=sampling.max_new_tokens,
                do_sample=not sampling.greedy,
                return_dict_in_generate=True,
                output_scores=want_logprobs,  # after temperature / top-k / top-p, as vLLM's processed log-probs
                pad_token_id=self.tokenizer.pad_token_id,
            )
            if sampling.ignore_eos:
                kwargs["eos_token_id"] = None
                kwargs["min_new_tokens"] = sampling.max_new_tokens
            if not sampling.greedy:
                kwargs.update(
                    temperature=sampling.temperature, top_p=sampling.top_p, top_k=max(sampling.top_k, 0)
                )
            out = self.model.generate(**batch, **kwargs)
            new_tokens = out.sequences[:, batch["input_ids"].shape[1] :]
            logprobs = None
            if want_logprobs:
                scores = torch.stack(out.scores, dim=1).float()
                logprobs = torch.log_softmax(scores, -1).gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
            for row, (prompt_index, _) in enumerate(chunk):
                ids = new_tokens[row].tolist()
                stop = len(ids)
                if not sampling.ignore_eos and eos in ids:
                    stop = ids.index(eos) + 1
                ids = ids[:stop]
                completions.append(
                    Completion(
                        prompt_index=prompt_index,
                        text=self.tokenizer.decode(ids, skip_special_tokens=True),
                        token_ids=ids,
                        logprobs=logprobs[row, :stop].tolist() if logprobs is not None else [],
                        truncated=not ids or ids[-1] != eos,
                    )
                )
        return GenerationResult(
            prompt_token_ids=encoded, completions=completions, seconds=time.perf_counter() - start
        )

    @torch.no_grad()
    def load_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        params = dict(self.model.named_parameters())
        for name, tensor in named_tensors:
            if name in params:
                params[name].copy_(tensor.to(params[name].device, params[name].dtype))
