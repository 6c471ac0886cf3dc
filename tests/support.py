"""What several test modules share, in one place: the paths, the tiny data knobs, the CLI run in a
subprocess (with an environment that imports this checkout) and in this process on a session engine, the
engine restore after a test trained into a shared engine, gradient capture and comparison, and the
reference log-prob formula the engine and trainer checks compare against.

Test modules import from here, never from one another.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import torch
from _paths import REPO_ROOT
from _paths import SHARED_DATA as SHARED_DATA  # re-exported: test modules take every path from here
from fitting import fit

from lit_dash.callbacks.weight_sync import WeightSync

REPO = REPO_ROOT
TESTS = REPO / "tests"
TINY = TESTS / "configs" / "tiny.yaml"  # two steps of the tiny random Llama through the CLI
TINY_SFT = TESTS / "configs" / "tiny_sft.yaml"
MONITOR = "eval/arithmetic/accuracy"  # what the shared CLI fit's StepCheckpoint keeps the best of

# rewards by row, for a rollout of 4 groups of 4: a constant group; [0, .5, .5, 1] whose middle two have
# A = 0 exactly; two mixed groups. Threshold 0.1 drops exactly the 6 zero-advantage completions.
NEUTRAL = [1.0, 1.0, 1.0, 1.0, 0.0, 0.5, 0.5, 1.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0]


# ---- the tiny data ----------------------------------------------------------------------------------


def tiny_data_knobs(**overrides) -> dict:
    """tests/configs/tiny.yaml's ``data:`` as RolloutDataModule keyword arguments (40 add1 problems,
    4 prompts x 4 completions, micro-batches of 4, no filter, 16 new tokens), with ``overrides``."""
    from lit_dash.data.datamodule import EngineConfig, ProblemSource
    from lit_dash.engines import SamplingConfig

    knobs = dict(
        train=ProblemSource(source="arithmetic", difficulty="add1", num_problems=40),
        instruction="Answer in one line.",
        prompts_per_rollout=4,
        group_size=4,
        micro_batch_size=4,
        filter_threshold=None,
        sampling=SamplingConfig(temperature=1.0, max_new_tokens=16),
        eval_max_new_tokens=16,
        engine=EngineConfig(kind="vllm", kv_cache_gib=0.5),
    )
    knobs.update(overrides)
    return knobs


# ---- the CLI ------------------------------------------------------------------------------------------


def cli_env(**extra: str) -> dict[str, str]:
    """The environment of a child process that imports this checkout's lit_dash (before any installed
    copy) and the test helpers the CLI loads by class path (tests/tiny_reward.py, tests/recorders.py)."""
    path = os.pathsep.join([str(REPO), str(TESTS)])
    return {**os.environ, "PYTHONPATH": path, **extra}


def cli_command(subcommand: str, *args: str, config: Path | str | None = TINY) -> list[str]:
    """``python -m lit_dash.cli <subcommand> [--config CONFIG] ARGS``."""
    cmd = [sys.executable, "-m", "lit_dash.cli", subcommand]
    if config is not None:
        cmd += ["--config", str(config)]
    return [*cmd, *args]


def run_logged(
    cmd: list[str], log: Path, *, env: dict[str, str] | None = None, expect: int = 0, timeout: float = 400
) -> str:
    """Run ``cmd`` from the repository root with stdout and stderr in ``log``; its exit status must be
    ``expect`` (a negative number: killed by that signal). Returns the log's text."""
    with log.open("w") as out:
        proc = subprocess.run(
            cmd, cwd=REPO, env=cli_env() if env is None else env, stdout=out, stderr=subprocess.STDOUT,
            timeout=timeout,
        )  # fmt: skip
    text = log.read_text()
    assert proc.returncode == expect, f"exit status {proc.returncode}, expected {expect}:\n{text[-4000:]}"
    return text


@contextlib.contextmanager
def session_engine_for_the_cli(engine):
    """Inside this block, a RolloutDataModule that would start an engine gets ``engine`` (a session
    engine, already started) instead: an in-process CLI fit then costs no engine start-up and no second
    engine's memory. Refused when the run's config asks for another model or dtype than ``engine``'s."""
    from lit_dash.data.datamodule import RolloutDataModule
    from lit_dash.hardware import resolve_dtype

    original = RolloutDataModule._start_engine

    def reuse(self):
        policy = self._policy()
        wanted = str(Path(policy.model_path()).resolve())
        served = str(Path(engine._llm.llm_engine.model_config.model).resolve())
        device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = resolve_dtype(self.engine_config.dtype, device)
        assert wanted == served, f"the run wants {wanted}, the session engine serves {served}"
        assert self.engine_config.kind == "vllm" and dtype == engine.dtype, (
            f"the run asks for a {self.engine_config.kind} {dtype} engine, the session engine is a vLLM "
            f"{engine.dtype} one: pin the dtype"
        )
        return engine

    RolloutDataModule._start_engine = reuse
    try:
        yield engine
    finally:
        RolloutDataModule._start_engine = original


# ---- the shared engines ---------------------------------------------------------------------------------


def restore_engine_weights(engine, path: str) -> None:
    """Push the weights on disk back into a shared engine (after a test trained into it)."""
    from transformers import AutoModelForCausalLM

    engine.load_weights(AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).state_dict().items())


def sequence_logprobs(model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """log p(token t | tokens before it) of a plain transformers forward, for every token but the first,
    in fp32: what an engine's prompt log-probs (``sequence_logprobs``) of the same weights must give."""
    device = next(model.parameters()).device
    with torch.no_grad():
        logits = model(torch.tensor([ids], device=device)).logits.float()[0, :-1]
    targets = torch.tensor(ids[1:], device=device).unsqueeze(-1)
    return torch.log_softmax(logits, -1).gather(-1, targets).squeeze(-1).cpu()


# ---- the parity fits: the tiny model at a temperature that is not 1, on a session engine ----------------

PARITY_TEMPERATURE = 1.3


class NoSync(WeightSync):
    """A weight sync that never pushes anything: the engine keeps the weights it started with."""

    def sync(self, trainer, pl_module) -> float:
        self.synced_step = trainer.global_step
        return 0.0


def parity_fit(
    engine,
    module,
    callbacks,
    steps: int = 2,
    filter_threshold: float | None = None,
    temperature: float = PARITY_TEMPERATURE,
    **fit_options,
) -> L.Trainer:
    """``steps`` optimizer steps of ``module`` on 16 add1 problems (4 prompts x 4 completions, micro-batches
    of 8, 12 new tokens at ``temperature``) with the session engine ``engine``; ``fit_options`` (``root``,
    ``ckpt_path``, ``enable_checkpointing``) go to tests/fitting.py's ``fit``."""
    from lit_dash.data.datamodule import EngineConfig, ProblemSource, RolloutDataModule
    from lit_dash.engines import SamplingConfig

    data = RolloutDataModule(
        train=ProblemSource(source="arithmetic", difficulty="add1", num_problems=16),
        prompts_per_rollout=4,
        group_size=4,
        micro_batch_size=8,
        filter_threshold=filter_threshold,
        sampling=SamplingConfig(temperature=temperature, max_new_tokens=12),
        max_prompt_tokens=64,
        engine=EngineConfig(kind="vllm", dtype=str(engine.dtype).removeprefix("torch.")),
    )
    return fit(module, data, engine=engine, max_steps=steps, callbacks=callbacks, **fit_options)


# ---- gradients and training-step records ---------------------------------------------------------------


class GradCapture(L.Callback):
    """The gradient of every optimizer step, as the optimizer is about to apply it."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append(
            {n: p.grad.clone() for n, p in pl_module.policy.named_parameters() if p.grad is not None}
        )


class Gaps(L.Callback):
    """Each step's logged engine/trainer log-prob gap (mean and max)."""

    def __init__(self) -> None:
        self.mean: list[float] = []
        self.max: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.mean.append(float(trainer.callback_metrics["train/engine_logprob_gap"]))
        self.max.append(float(trainer.callback_metrics["train/engine_logprob_gap_max"]))


def worst(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """The largest difference between two gradients, each tensor's relative to ``b``'s largest entry."""
    assert a.keys() == b.keys(), set(a) ^ set(b)
    return max(float((a[n] - b[n]).abs().max() / b[n].abs().max().clamp_min(1e-30)) for n in b)
