"""Every phase of a lit_dash step next to its own limit, on the same shapes, in one run.

Two settings, both the demo's (configs/demo.yaml: model, prompts x completions, sampling, micro-batch),
the second with longer completions (``--max-new-tokens 64,256``; ``--long-prompts`` prompts there). Each
setting trains ``--steps`` real steps through the demo's DashModule and RolloutDataModule (the first is a
warm-up) and measures the last one against the limit of each phase:

    generation        the rollout's completion tok/s (RolloutBuffer -> VLLMEngine, as training runs it)
                      vs plain ``vllm.LLM.generate`` of the same prompts, n=G, the same SamplingParams,
                      the best of prefix caching off (the training engine itself) and on (block 32)
    forward+backward  the module's forward_backward phase (trained tokens / s, as TimingProfile reports)
                      vs a bare loop on the same micro-batches: decoder forward over prompt + completion,
                      LM head on completion positions only, log-softmax gather, backward; and both as
                      model-FLOPs utilisation of the matmul peak measured in this run
    weight sync       WeightSync's push into the engine vs ``copy_`` of the same tensors into
                      preallocated tensors of the engine's dtype
    checkpoint        ``trainer.save_checkpoint`` (the project's AtomicCheckpointIO) vs a raw
                      ``torch.save`` of the same checkpoint dict to the same disk

All completions are trained (``filter_threshold: null``), so forward+backward runs on the whole rollout's
shapes (the demo's filter changes how many micro-batches a step has, not how fast each runs). Prints a
markdown table and a "where the gap is" paragraph computed from the measurements; writes a JSON.

    .venv/bin/python benchmarks/efficiency.py                     # SmolLM2-135M, about 8 min on 2 cores
    .venv/bin/python benchmarks/efficiency.py --model tiny-llama --prompts 2 --long-prompts 2 \\
        --group-size 4 --micro-batch 4 --max-new-tokens 8,16      # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO_CONFIG = REPO / "configs" / "demo.yaml"
PREFIX_BLOCK = 32  # the CPU backend's default block (128 tokens) is longer than a demo prompt


# ---- the machine and its matmul peak -------------------------------------------------------------------


def machine_info(precision: torch.dtype) -> dict:
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        model = next(
            (line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")), model
        )
        flags = set(next((line for line in lines if line.startswith("flags")), "").split())
    except OSError:
        pass
    import vllm

    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "flags": {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")},
        "precision": str(precision).removeprefix("torch."),
        "torch": torch.__version__,
        "vllm": vllm.__version__,
    }


def matmul_gflops(m: int, k: int, n: int, dtype: torch.dtype, min_seconds: float = 0.3) -> float:
    """GFLOP/s of ``[m, k] @ [k, n]`` (2mkn FLOPs), the best of repeated timed calls after a warm-up."""
    a, b = torch.randn(m, k).to(dtype), torch.randn(k, n).to(dtype)
    torch.matmul(a, b)
    best, spent = math.inf, 0.0
    while spent < min_seconds:
        start = time.perf_counter()
        torch.matmul(a, b)
        seconds = time.perf_counter() - start
        best, spent = min(best, seconds), spent + seconds
    return 2 * m * k * n / best / 1e9


def matmul_peak(config, tokens: int, head_tokens: int, dtype: torch.dtype) -> dict:
    """The matmul throughput at the model's own shapes: the MLP's two projections over a micro-batch's
    tokens and the LM head over its completion tokens. The peak is the best of them."""
    d, ffn, vocab = config.hidden_size, config.intermediate_size, config.vocab_size
    shapes = {
        f"[{tokens} x {d}] @ [{d} x {ffn}]": (tokens, d, ffn),
        f"[{tokens} x {ffn}] @ [{ffn} x {d}]": (tokens, ffn, d),
        f"[{head_tokens} x {d}] @ [{d} x {vocab}]": (head_tokens, d, vocab),
    }
    gflops = {name: matmul_gflops(*shape, dtype) for name, shape in shapes.items()}
    return {"dtype": str(dtype).removeprefix("torch."), "gflops": gflops, "peak_gflops": max(gflops.values())}


# ---- model FLOPs ---------------------------------------------------------------------------------------


def model_flops(config, micro_batches) -> dict:
    """Training FLOPs of the micro-batches (3 x forward: forward + backward's two matmuls per matmul).

    forward = 2 x (decoder matmul weights) per real token (6 x non-embedding params x tokens in all)
            + 2 x hidden x vocab per completion token (the LM head, completion positions only)
            + 2 x layers x L^2 x heads x head_dim per sequence of L real tokens (QK^T and AV, causal half)
    Padding, the chunked LM head's recomputation and anything else a loop adds are not model FLOPs.
    """
    d, layers = config.hidden_size, config.num_hidden_layers
    head_dim = getattr(config, "head_dim", None) or d // config.num_attention_heads
    attn, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    per_layer = d * attn + 2 * d * kv + attn * d + 3 * d * config.intermediate_size
    non_embedding = layers * per_layer
    tokens = completion_tokens = square = 0
    for mb in micro_batches:
        lengths = mb.attention_mask.sum(dim=1)
        tokens += int(lengths.sum())
        completion_tokens += int(mb.completion_mask.sum())
        square += int((lengths.double() ** 2).sum())
    forward = 2 * non_embedding * tokens + 2 * d * config.vocab_size * completion_tokens
    forward += 2 * layers * attn * square
    return {
        "flops": 3 * forward,
        "non_embedding_params": non_embedding,
        "trained_tokens": tokens,
        "completion_tokens": completion_tokens,
    }


# ---- building the demo's module and datamodule ---------------------------------------------------------


def demo_parts(args, max_new: int, prompts: int, root: str):
    """DashModule and RolloutDataModule exactly as ``lit-dash fit --config configs/demo.yaml`` builds
    them, with this setting's overrides."""
    from lit_dash.cli import build_cli

    overrides = {
        "model.init_args.model": args.model,
        "data.filter_threshold": "null",
        "data.prompts_per_rollout": prompts,
        "data.sampling.max_new_tokens": max_new,
        "data.engine.max_model_len": args.max_model_len,
        "trainer.default_root_dir": root,
    }
    if args.precision:
        overrides["model.init_args.precision"] = args.precision
        overrides["data.engine.dtype"] = args.precision
    if args.shared_prefix is not None:
        overrides["model.init_args.shared_prefix"] = str(args.shared_prefix).lower()
    if args.group_size:
        overrides["data.group_size"] = args.group_size
    if args.micro_batch:
        overrides["data.micro_batch_size"] = args.micro_batch
    cli_args = ["--config", str(DEMO_CONFIG)]
    for key, value in overrides.items():
        cli_args += [f"--{key}", str(value)]
    argv, sys.argv = sys.argv, sys.argv[:1]  # LightningCLI warns when it sees both args and sys.argv
    try:
        cli = build_cli(cli_args, run=False)
    finally:
        sys.argv = argv
    return cli.model, cli.datamodule


def train(module, datamodule, steps: int, root: str):
    import lightning as L

    from lit_dash.callbacks import TimingProfile
    from lit_dash.callbacks.atomic_io import AtomicCheckpointIO

    timing = TimingProfile()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=steps,
        logger=False,
        callbacks=[timing],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,  # as the demo: held-out evaluation is a callback there, not timed here
        num_sanity_val_steps=0,
        plugins=[AtomicCheckpointIO()],
        default_root_dir=root,
        log_every_n_steps=1,
    )
    trainer.fit(module, datamodule=datamodule)
    return trainer, timing.rows[-1]


# ---- generation ----------------------------------------------------------------------------------------


def plain_generate(llm, prompts: list[str], group: int, sampling) -> dict:
    """``LLM.generate`` with the SamplingParams lit_dash's engine builds for a rollout (log-probs of the
    sampled tokens included), nothing around it."""
    from vllm import SamplingParams

    params = SamplingParams(
        n=group,
        temperature=sampling.temperature,
        top_p=sampling.top_p,
        top_k=sampling.top_k if sampling.top_k > 0 else 0,
        max_tokens=sampling.max_new_tokens,
        ignore_eos=sampling.ignore_eos,
        logprobs=0,
    )
    start = time.perf_counter()
    outputs = llm.generate(prompts, params, use_tqdm=False)
    seconds = time.perf_counter() - start
    tokens = sum(len(sample.token_ids) for out in outputs for sample in out.outputs)
    return {"seconds": seconds, "completion_tokens": tokens, "tokens_per_s": tokens / seconds}


def generation_limit(engines: dict, prompts: list[str], group: int, sampling, repeats: int) -> dict:
    """Plain vLLM on each engine (prefix caching off / on), the best of ``repeats`` calls each."""
    out = {}
    for name, engine in engines.items():
        runs = [plain_generate(engine._llm, prompts, group, sampling) for _ in range(repeats)]
        out[name] = max(runs, key=lambda r: r["tokens_per_s"])
    return out


def caching_engine(path: str, like, max_model_len: int, kv_cache_gib: float):
    """A second engine on the same model, with prefix caching on (block 32)."""
    from vllm import SamplingParams

    from lit_dash.engines.vllm_engine import VLLMEngine

    engine = VLLMEngine(
        path,
        seed=0,
        kv_cache_gib=kv_cache_gib,
        max_model_len=max_model_len,
        dtype=str(like.dtype).removeprefix("torch."),
        prefix_caching=True,
        block_size=PREFIX_BLOCK,
    )
    engine._llm.generate(["warm-up"], SamplingParams(max_tokens=4), use_tqdm=False)
    return engine


# ---- forward + backward --------------------------------------------------------------------------------


def bare_loss(policy, mb, temperature: float) -> torch.Tensor:
    """Decoder over prompt + completion, LM head on completion positions only, log-softmax gather."""
    hidden = policy.get_decoder()(input_ids=mb.input_ids, attention_mask=mb.attention_mask).last_hidden_state
    positions = mb.completion_mask > 0
    logits = policy.get_output_embeddings()(hidden[:, :-1][positions])
    targets = mb.input_ids[:, 1:][positions]
    logprobs = torch.log_softmax(logits.float() / temperature, dim=-1).gather(-1, targets[:, None])
    return -logprobs.sum() / max(1, targets.numel())


def bare_forward_backward(module, micro_batches) -> dict:
    """The bare loop over the micro-batches (gradients accumulate, as in a step), timed as a whole."""
    policy = module.policy
    policy.zero_grad(set_to_none=True)
    tokens = completion_tokens = 0
    start = time.perf_counter()
    for mb in micro_batches:
        with module._autocast():
            loss = bare_loss(policy, mb, mb.temperature or 1.0)
        loss.backward()
        tokens += int(mb.attention_mask.sum())
        completion_tokens += int((mb.completion_mask > 0).sum())
    seconds = time.perf_counter() - start
    policy.zero_grad(set_to_none=True)
    return {"seconds": seconds, "trained_tokens": tokens, "completion_tokens": completion_tokens}


def lit_dash_forward_backward(module, micro_batches, max_new: int) -> None:
    """lit_dash's own micro-batch loss over the micro-batches, each backward, gradients accumulating (the
    step's forward_backward phase without the trainer around it)."""
    counts = module.step_counts(micro_batches, max_new)
    for mb in micro_batches:
        module.micro_batch_loss(mb, counts)[0].backward()


def layouts(module, buffer, rollout, max_new: int, rounds: int) -> dict:
    """Forward+backward of the step's completions three ways, interleaved, ``rounds`` times (the best of
    each): the bare per-row loop and lit_dash on the per-row layout's micro-batches (sorted by length, one
    completion a row), and lit_dash on the shared-prefix layout's (whole groups, one prompt each). The
    same rows, the same micro-batch size; the trainer's precision."""
    from dataclasses import replace

    rows = [i for i in range(len(rollout.completions)) if bool(rollout.kept[i])]
    args = (rows, rollout.prompt_token_ids, rollout.completions, rollout.advantages)
    per_row = replace(buffer, shared_prefix=False)._micro_batches(*args)
    packed = replace(buffer, shared_prefix=True)._micro_batches(*args)
    saved = module.hparams.get("shared_prefix", False)
    module.hparams.shared_prefix, module._packs_policy = True, None
    policy = module.policy

    def fresh() -> None:
        policy.zero_grad(set_to_none=True)

    def bare() -> None:
        for mb in per_row:
            with module._autocast():
                loss = bare_loss(policy, mb, mb.temperature or 1.0)
            loss.backward()

    runs = {
        "bare_per_row": bare,
        "lit_dash_per_row": lambda: lit_dash_forward_backward(module, per_row, max_new),
        "lit_dash_shared_prefix": lambda: lit_dash_forward_backward(module, packed, max_new),
    }
    seconds: dict[str, list[float]] = {k: [] for k in runs}
    try:
        for _ in range(rounds):
            for key, fn in runs.items():
                fresh()
                seconds[key].append(_timed(fn))
    finally:
        module.hparams.shared_prefix, module._packs_policy = saved, None
        fresh()
    best = {k: min(v) for k, v in seconds.items()}
    return {
        "seconds": best,
        "all_seconds": seconds,
        "rounds": rounds,
        "completions": len(rows),
        "micro_batches": {"per_row": len(per_row), "shared_prefix": len(packed)},
        "tokens": {  # encoded (padding excluded) and run (padding included)
            "per_row": sum(mb.num_tokens for mb in per_row),
            "per_row_padded": sum(mb.padded_tokens for mb in per_row),
            "shared_prefix": sum(mb.num_tokens for mb in packed),
            "shared_prefix_padded": sum(mb.padded_tokens for mb in packed),
        },
        "speedup_over_bare": best["bare_per_row"] / best["lit_dash_shared_prefix"],
        "per_row_over_bare": best["bare_per_row"] / best["lit_dash_per_row"],
    }


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def _best(fn, reset, runs: int = 3, budget_s: float = 1.0) -> float:
    """The fastest of up to ``runs`` calls, fewer once ``budget_s`` is spent (one, for a slow call);
    ``reset`` runs before each, untimed."""
    times: list[float] = []
    while len(times) < runs and sum(times) < budget_s:
        reset()
        times.append(_timed(fn))
    return min(times)


def diagnose(module, micro_batches, max_new: int) -> dict:
    """Where forward+backward's time goes, on the median micro-batch (by padded tokens; the largest would
    cost too long at 256 new tokens): the bare loop whole and without
    the LM head (its decoder's gradient only), lit_dash's micro-batch loss chunked as configured and
    unchunked, and a torch.profiler breakdown of the bare loop by operator."""
    from torch.profiler import ProfilerActivity, profile

    mb = sorted(micro_batches, key=lambda m: m.input_ids.numel())[len(micro_batches) // 2]
    policy = module.policy
    temperature = mb.temperature or 1.0

    def bare() -> None:
        with module._autocast():
            bare_loss(policy, mb, temperature).backward()

    def decoder_only() -> None:
        with module._autocast():
            hidden = policy.get_decoder()(input_ids=mb.input_ids, attention_mask=mb.attention_mask)
            hidden.last_hidden_state[:, :-1][mb.completion_mask > 0].float().mean().backward()

    counts = module.step_counts([mb], max_new)

    def lit_dash() -> None:
        module.micro_batch_loss(mb, counts)[0].backward()

    def fresh() -> None:  # every call starts without gradients, as a training step does
        policy.zero_grad(set_to_none=True)

    chunk = module.hparams.logprob_chunk_tokens
    seconds = {"bare": _best(bare, fresh), "bare_without_lm_head": _best(decoder_only, fresh)}
    seconds[f"lit_dash_chunk_{chunk or 0}"] = _best(lit_dash, fresh)
    module.hparams.logprob_chunk_tokens = 0
    try:
        seconds["lit_dash_chunk_0"] = _best(lit_dash, fresh)
    finally:
        module.hparams.logprob_chunk_tokens = chunk
    fresh()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        bare()
    policy.zero_grad(set_to_none=True)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) or 1.0

    def share(*needles: str) -> float:
        return sum(e.self_cpu_time_total for e in events if any(n in e.key for n in needles)) / total

    return {
        "micro_batch": list(mb.input_ids.shape),
        "micro_batch_tokens": int(mb.attention_mask.sum()),
        "seconds": seconds,
        "lm_head_share": max(0.0, 1.0 - seconds["bare_without_lm_head"] / seconds["bare"]),
        "profile_shares": {
            "matmul": share("aten::mm", "aten::addmm", "aten::bmm"),
            "attention": share("scaled_dot_product"),
            "log_softmax": share("log_softmax"),
        },
        "chunking_overhead": seconds[f"lit_dash_chunk_{chunk or 0}"] / seconds["lit_dash_chunk_0"] - 1.0,
    }


# ---- weight sync and checkpoint ------------------------------------------------------------------------


def weight_sync(trainer, module, engine, step_seconds: float, repeats: int) -> dict:
    """WeightSync's push (the step's, and ``repeats`` more) vs copy_ into preallocated engine tensors."""
    from lit_dash.callbacks.weight_sync import WeightSync, engine_weights

    sync = WeightSync()
    pushes = [step_seconds] + [sync.sync(trainer, module) for _ in range(repeats)]
    with torch.no_grad():
        pairs = [t.detach() for _, t in engine_weights(module.policy, fsdp=False)]
        targets = [torch.empty(t.shape, dtype=engine.dtype) for t in pairs]

        def copy() -> None:
            for target, source in zip(targets, pairs, strict=True):
                target.copy_(source)

        copies = [_timed(copy) for _ in range(max(3, repeats))]
    return {
        "push_seconds": statistics.median(pushes),
        "pushes": pushes,
        "copy_seconds": statistics.median(copies),
        "bytes": sum(t.numel() * engine.dtype.itemsize for t in targets),
        "engine_dtype": str(engine.dtype).removeprefix("torch."),
    }


def checkpoint(trainer, folder: Path, repeats: int) -> dict:
    """trainer.save_checkpoint (AtomicCheckpointIO: temporary file, fsync, rename) vs a raw torch.save
    of the same checkpoint dict (and the same with an fsync), the best of ``repeats`` each, alternated."""
    from lit_dash.callbacks.atomic_io import AtomicCheckpointIO

    if not isinstance(trainer.strategy.checkpoint_io, AtomicCheckpointIO):
        raise RuntimeError(
            f"expected AtomicCheckpointIO, got {type(trainer.strategy.checkpoint_io).__name__}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    path, raw_path = folder / "step.ckpt", folder / "raw.pt"

    def raw_save(state: dict, fsync: bool) -> float:
        start = time.perf_counter()
        with open(raw_path, "wb") as f:
            torch.save(state, f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        seconds = time.perf_counter() - start
        raw_path.unlink()
        return seconds

    lit, raw, raw_fsync, dump = [], [], [], []
    size = 0
    for _ in range(repeats):
        start = time.perf_counter()
        trainer.save_checkpoint(path)
        lit.append(time.perf_counter() - start)
        size = path.stat().st_size
        path.unlink()
        start = time.perf_counter()
        state = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
        dump.append(time.perf_counter() - start)
        raw.append(raw_save(state, fsync=False))
        raw_fsync.append(raw_save(state, fsync=True))
        del state
        gc.collect()
    return {
        "lit_dash_seconds": min(lit),
        "raw_seconds": min(raw),
        "raw_fsync_seconds": min(raw_fsync),
        "dump_checkpoint_seconds": min(dump),
        "bytes": size,
    }


# ---- one setting ---------------------------------------------------------------------------------------


class Stopwatch:
    """Wall seconds of each stage of the benchmark itself (what a run's time goes to)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

        self.load: dict[str, float] = {}  # the 1-minute load average at each stage's end

    @contextlib.contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[stage] = self.seconds.get(stage, 0.0) + time.perf_counter() - start
            self.load[stage] = os.getloadavg()[0]


def run_setting(name: str, args, max_new: int, prompts: int, shared: dict) -> dict:
    from lit_dash.callbacks.weight_sync import engine_weights
    from lit_dash.data.formatting import format_prompts

    clock = Stopwatch()
    root = tempfile.mkdtemp(prefix=f"efficiency_{max_new}_", dir=args.work_dir)
    with clock("build"):
        module, dm = demo_parts(args, max_new, prompts, root)
    if "engine" in shared:
        dm.engine = shared["engine"]  # one training engine for both settings (max_model_len fits both)
    with clock("fit"):
        trainer, row = train(module, dm, args.steps, root)
    shared["engine"] = dm.engine
    rollout = module.last_rollout
    micro_batches = rollout.micro_batches
    stats = rollout.stats()

    # generation: the same prompts through plain vLLM, prefix caching off (the training engine) and on
    texts = format_prompts(rollout.problems, dm.engine.tokenizer, dm.prompt_style, dm.instruction)
    with clock("caching engine"):
        if "caching" not in shared:
            shared["caching"] = caching_engine(
                module.model_path(), dm.engine, args.max_model_len, dm.engine_config.kv_cache_gib
            )
        with torch.no_grad():  # the same weights in both engines
            shared["caching"].load_weights(engine_weights(module.policy, fsdp=False))
    key_off, key_on = "prefix caching off", f"prefix caching on (block {PREFIX_BLOCK})"
    engines = {key_off: dm.engine, key_on: shared["caching"]}
    if dm.engine.prefix_caching:
        engines = {key_on + ", the training engine": dm.engine, key_off: shared["caching"]}
    with clock("plain generation"):
        limits = generation_limit(engines, texts, rollout.group_size, dm.sampling, args.repeats)
    best = max(limits, key=lambda k: limits[k]["tokens_per_s"])
    generation = {
        "lit_dash_tokens_per_s": row["generation_tokens_per_s"],
        "lit_dash_seconds": row["generation"],
        "lit_dash_completion_tokens": rollout.sampled_tokens,
        "limit_tokens_per_s": limits[best]["tokens_per_s"],
        "limit_setting": best,
        "plain": limits,
    }

    # forward + backward: the step's phase vs the bare loop on the same micro-batches
    with clock("bare loop"):
        bare = bare_forward_backward(module, micro_batches)
    flops = model_flops(module.policy.config, micro_batches)
    biggest = max(micro_batches, key=lambda m: m.input_ids.numel())
    dtype = getattr(module._autocast(), "fast_dtype", torch.float32)
    with clock("matmul peak"):  # at this setting's largest micro-batch; MFU uses the best of all settings
        peak = matmul_peak(
            module.policy.config, int(biggest.attention_mask.sum()), int(biggest.completion_mask.sum()), dtype
        )
    with clock("diagnosis"):
        diag = diagnose(module, micro_batches, max_new)
    with clock("layouts"):
        layout = layouts(module, dm.buffer, rollout, max_new, args.layout_rounds)
    forward_backward = {
        "lit_dash_seconds": row["forward_backward"],
        "lit_dash_tokens_per_s": row["train_tokens_per_s"],
        "lit_dash_trained_tokens": sum(mb.num_tokens for mb in micro_batches),
        "bare_seconds": bare["seconds"],
        "bare_tokens_per_s": bare["trained_tokens"] / bare["seconds"],
        "bare_trained_tokens": bare["trained_tokens"],
        "bare_completion_tokens": bare["completion_tokens"],
        "micro_batches": [list(mb.input_ids.shape) for mb in micro_batches],
        "padding_fraction": stats["padding_fraction"],
        "model_flops": flops,
        "flops_formula": "3 x (2 x non-embedding params x tokens + 2 x hidden x vocab x completion tokens "
        "+ 2 x layers x heads x head_dim x sum of L^2 per sequence)",
        "matmul_peak_here": peak,  # "matmul_peak", "lit_dash_mfu" and "bare_mfu": set by add_mfu
        "autocast": str(dtype).removeprefix("torch.") if dtype != torch.float32 else None,
        "diagnosis": diag,
        "logprob_chunk_tokens": module.hparams.logprob_chunk_tokens,
        "shared_prefix": module.shared_prefix,
        "layouts": layout,
    }
    with clock("weight sync"):
        sync = weight_sync(trainer, module, dm.engine, row["weight_sync"], args.sync_repeats)
    with clock("checkpoint"):
        ckpt = checkpoint(trainer, Path(root) / "checkpoints", args.checkpoint_repeats)
    result = {
        "setting": name,
        "max_new_tokens": max_new,
        "prompts": prompts,
        "group_size": rollout.group_size,
        "micro_batch_size": dm.micro_batch_size,
        "completions": len(rollout.completions),
        "completion_tokens_mean": stats["completion_tokens_mean"],
        "steps": args.steps,
        "step_row": row,
        "generation": generation,
        "forward_backward": forward_backward,
        "weight_sync": sync,
        "checkpoint": ckpt,
        "benchmark_seconds": clock.seconds,
        "load_average": clock.load,
    }
    del trainer, module
    gc.collect()
    return result


def add_mfu(results: list[dict]) -> dict:
    """Model-FLOPs utilisation of every setting against one peak: the best matmul throughput measured at
    any setting's shapes (a setting's larger shapes may run faster than another's)."""
    gflops: dict[str, float] = {}
    for result in results:
        gflops.update(result["forward_backward"]["matmul_peak_here"]["gflops"])
    dtype = results[0]["forward_backward"]["matmul_peak_here"]["dtype"]
    peak = {"dtype": dtype, "gflops": gflops, "peak_gflops": max(gflops.values())}
    for result in results:
        fb = result["forward_backward"]
        flops, per_s = fb["model_flops"]["flops"], peak["peak_gflops"] * 1e9
        fb.update(
            matmul_peak=peak,
            lit_dash_mfu=flops / fb["lit_dash_seconds"] / per_s,
            bare_mfu=flops / fb["bare_seconds"] / per_s,
        )
    return peak


# ---- the report ----------------------------------------------------------------------------------------


def table_rows(result: dict) -> list[tuple[str, float, float, float, str]]:
    """(phase, lit_dash, limit, ratio, unit); ratio is lit_dash's speed over the limit's (1 = at the
    limit, below 1 slower): tok/s over tok/s, limit seconds over lit_dash seconds."""
    g, fb, ws, ck = (result[k] for k in ("generation", "forward_backward", "weight_sync", "checkpoint"))
    peak = fb["matmul_peak"]["peak_gflops"]
    lay = fb["layouts"]["seconds"]
    return [
        ("generation", g["lit_dash_tokens_per_s"], g["limit_tokens_per_s"],
         g["lit_dash_tokens_per_s"] / g["limit_tokens_per_s"], "completion tok/s"),
        ("forward+backward", fb["lit_dash_seconds"], fb["bare_seconds"], fb["bare_seconds"] / fb["lit_dash_seconds"],
         "s, the step's phase vs the bare loop on its completions, one row each"),
        ("forward+backward MFU", fb["lit_dash_mfu"], fb["bare_mfu"], fb["lit_dash_mfu"] / fb["bare_mfu"],
         f"of {peak:.0f} GFLOP/s {fb['matmul_peak']['dtype']} matmul peak"),
        ("forward+backward, per row", lay["lit_dash_per_row"], lay["bare_per_row"],
         lay["bare_per_row"] / lay["lit_dash_per_row"], "s, the step's completions, vs the bare per-row loop"),
        ("forward+backward, shared prefix", lay["lit_dash_shared_prefix"], lay["bare_per_row"],
         lay["bare_per_row"] / lay["lit_dash_shared_prefix"], "s, the same completions, vs the bare per-row loop"),
        ("weight sync", ws["push_seconds"], ws["copy_seconds"], ws["copy_seconds"] / ws["push_seconds"],
         f"s ({ws['bytes'] / 2**20:.0f} MiB {ws['engine_dtype']})"),
        ("checkpoint", ck["lit_dash_seconds"], ck["raw_seconds"], ck["raw_seconds"] / ck["lit_dash_seconds"],
         f"s ({ck['bytes'] / 2**20:.0f} MiB)"),
    ]  # fmt: skip


def _number(x: float) -> str:
    return f"{x:.3f}" if abs(x) < 10 else f"{x:.0f}"


def print_table(results: list[dict]) -> str:
    lines = ["| setting | phase | lit_dash | limit | ratio | unit |", "|---|---|---:|---:|---:|---|"]
    for result in results:
        for phase, lit, limit, ratio, unit in table_rows(result):
            lines.append(
                f"| {result['setting']} | {phase} | {_number(lit)} | {_number(limit)} | {ratio:.2f} | {unit} |"
            )
    lines.append(
        "ratio: lit_dash's speed over the limit's (1.00 = at the limit; tok/s over tok/s, limit s over lit_dash s)"
    )
    return "\n".join(lines)


def gap_paragraph(result: dict) -> str:
    g, fb, ws, ck = (result[k] for k in ("generation", "forward_backward", "weight_sync", "checkpoint"))
    d = fb["diagnosis"]
    plain = g["plain"]
    off = next((v for k, v in plain.items() if k.startswith("prefix caching off")), None)
    on = next((v for k, v in plain.items() if k.startswith("prefix caching on")), None)
    parts = [
        f"{result['setting']} ({result['completions']} completions, {result['completion_tokens_mean']:.0f} "
        f"tokens mean, max {result['max_new_tokens']}):"
    ]
    text = (
        f"generation runs at {g['lit_dash_tokens_per_s'] / g['limit_tokens_per_s']:.0%} of plain vLLM's best "
        f"({g['limit_setting']})"
    )
    if off and on:
        text += f"; prefix caching on gives x{on['tokens_per_s'] / off['tokens_per_s']:.2f} over off"
    parts.append(text + ".")
    chunk_key = next(k for k in d["seconds"] if k.startswith("lit_dash_chunk_") and k != "lit_dash_chunk_0")
    chunk_text = (
        f"chunked log-probs (logprob_chunk_tokens={fb['logprob_chunk_tokens']}) cost {d['chunking_overhead']:+.0%} "
        "against unchunked"
        if chunk_key != "lit_dash_chunk_0"
        else "log-probs unchunked"
    )
    lit_vs_bare = d["seconds"].get(chunk_key, d["seconds"]["lit_dash_chunk_0"]) / d["seconds"]["bare"]
    shares = d["profile_shares"]
    parts.append(
        f"forward+backward runs at {fb['bare_seconds'] / fb['lit_dash_seconds']:.0%} of the bare "
        f"loop (MFU {fb['lit_dash_mfu']:.1%} vs {fb['bare_mfu']:.1%}); both compute the padding, "
        f"{fb['padding_fraction']:.0%} of the micro-batch tokens; on the median micro-batch "
        f"({d['micro_batch'][0]} x {d['micro_batch'][1]}) lit_dash's loss takes x{lit_vs_bare:.2f} the bare "
        f"loop's time, {chunk_text}; the LM head + log-softmax is {d['lm_head_share']:.0%} of the bare loop "
        f"(profiler: matmuls {shares['matmul']:.0%}, attention {shares['attention']:.0%}, log-softmax "
        f"{shares['log_softmax']:.0%} of operator time); "
        + (f"autocast to {fb['autocast']} recasts weights every step." if fb["autocast"] else
           "no autocast (fp32): no recast.")
    )  # fmt: skip
    lay = fb["layouts"]
    parts.append(
        f"shared prefix: {lay['tokens']['shared_prefix']} tokens encoded for the per-row layout's "
        f"{lay['tokens']['per_row']} ({lay['micro_batches']['shared_prefix']} micro-batches against "
        f"{lay['micro_batches']['per_row']}); forward+backward x{lay['speedup_over_bare']:.2f} the bare per-row loop "
        f"(lit_dash per row x{lay['per_row_over_bare']:.2f}), best of {lay['rounds']} interleaved rounds."
    )
    parts.append(
        f"weight sync: the push takes x{ws['push_seconds'] / ws['copy_seconds']:.1f} a plain copy of the same "
        f"{ws['bytes'] / 2**20:.0f} MiB (vLLM's layer-wise reload and prefix-cache reset)."
    )
    parts.append(
        f"checkpoint: x{ck['lit_dash_seconds'] / ck['raw_seconds']:.2f} a raw torch.save; its fsync alone "
        f"brings torch.save to x{ck['raw_fsync_seconds'] / ck['raw_seconds']:.2f}, and assembling the "
        f"state (dump_checkpoint) takes {ck['dump_checkpoint_seconds']:.2f} s."
    )
    rows = table_rows(result)
    worst = min((r for r in rows if r[0] != "forward+backward MFU"), key=lambda r: r[3])
    parts.append(f"The largest gap: {worst[0]} ({worst[3]:.2f} of its limit's speed).")
    return " ".join(parts)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias, folder or hub id")
    parser.add_argument(
        "--max-new-tokens", default="64,256", help="one setting per value (completion tokens)"
    )
    parser.add_argument(
        "--prompts", type=int, default=12, help="prompts per rollout, first setting (demo: 12)"
    )
    parser.add_argument("--long-prompts", type=int, default=6, help="prompts per rollout, the other settings")
    parser.add_argument("--group-size", type=int, default=None, help="completions per prompt (demo: 8)")
    parser.add_argument(
        "--micro-batch", type=int, default=None, help="completions per micro-batch (demo: 16)"
    )
    parser.add_argument(
        "--max-model-len", type=int, default=None, help="default: 128 + the longest completion"
    )
    parser.add_argument(
        "--steps", type=int, default=2, help="training steps per setting; the last is measured"
    )
    parser.add_argument(
        "--precision", choices=["auto", "float32", "bfloat16"], default=None,
        help="trainer and engine precision (default: the demo's, auto)",
    )  # fmt: skip
    parser.add_argument(
        "--shared-prefix", type=lambda v: v.lower() in ("1", "true", "yes", "on"), default=None,
        help="model.shared_prefix in the fitted steps (default: the demo's); the layout rows measure both",
    )  # fmt: skip
    parser.add_argument(
        "--layout-rounds", type=int, default=3, help="interleaved rounds of the layout timing"
    )
    parser.add_argument("--repeats", type=int, default=1, help="plain vLLM calls per caching setting (best)")
    parser.add_argument("--sync-repeats", type=int, default=3, help="extra weight pushes (median)")
    parser.add_argument("--checkpoint-repeats", type=int, default=2, help="saves of each kind (best)")
    parser.add_argument("--work-dir", default=None, help="run folders and checkpoints (default: a temp dir)")
    parser.add_argument("--out", default="benchmarks/results/efficiency.json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    lengths = [int(x) for x in args.max_new_tokens.split(",") if x.strip()]
    if not lengths or min(lengths) < 1 or args.steps < 1:
        parser.error("--max-new-tokens needs positive token counts and --steps >= 1")
    # the demo's max_prompt_tokens (128) + the longest completion (its eval_max_new_tokens is 64)
    args.max_model_len = args.max_model_len or 128 + max(64, *lengths)
    if args.work_dir:
        Path(args.work_dir).mkdir(parents=True, exist_ok=True)

    shared: dict = {}
    results = []
    for i, max_new in enumerate(lengths):
        name = "demo" if i == 0 else f"{max_new} new tokens"
        prompts = args.prompts if i == 0 else args.long_prompts
        results.append(run_setting(name, args, max_new, prompts, shared))
    add_mfu(results)
    precision = torch.float32
    if results[0]["forward_backward"]["autocast"]:
        precision = getattr(torch, results[0]["forward_backward"]["autocast"])
    for engine in (shared.get("caching"), shared.get("engine")):
        if engine is not None:
            engine.close()
    wall = time.perf_counter() - start
    report = {
        "model": args.model,
        "machine": machine_info(precision),
        "args": vars(args),
        "wall_seconds": wall,
        "results": results,
        "table": [
            dict(
                zip(
                    ("setting", "phase", "lit_dash", "limit", "ratio", "unit"),
                    (r["setting"], *row),
                    strict=True,
                )
            )
            for r in results
            for row in table_rows(r)
        ],
    }
    report["where_the_gap_is"] = [gap_paragraph(r) for r in results]
    m = report["machine"]
    print(
        f"\n{args.model} on {m['cpu']} ({m['cores']} cores, torch threads {m['torch_threads']}; "
        f"{', '.join(f for f, on in m['flags'].items() if on) or 'no avx2'}); precision {m['precision']}; "
        f"torch {m['torch']}, vllm {m['vllm']}\n"
    )
    print(print_table(results))
    print("\nwhere the gap is:")
    for paragraph in report["where_the_gap_is"]:
        print(f"- {paragraph}")
    busiest = max(load for r in results for load in r["load_average"].values())
    if busiest > (os.cpu_count() or 1):
        print(
            f"\nWARNING: the 1-minute load average reached {busiest:.1f} on {os.cpu_count()} cores during the "
            "run: other processes shared the CPU, and lit_dash's figures and their limits were measured at "
            "different moments (load per stage in the JSON: results[].load_average)"
        )
    print(f"\nwall time: {wall:.0f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    return report


if __name__ == "__main__":
    main()
