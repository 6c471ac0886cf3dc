"""What a run prints: one place decides which library messages a user never needs, and how progress shows.

:func:`quiet` installs every filter below, each a message that asks nothing of the user, with the reason
it is dropped. It is idempotent and cheap; ``lit-dash`` calls it at start-up, and the datamodule and the
vLLM engine call it again when they start (vLLM configures its loggers on import, so library use without
the CLI is quiet too). ``LIT_DASH_VERBOSE=1`` turns all of it off: every library line comes back.

Progress inside a phase (an engine call while sampling or evaluating) goes through :func:`phase` and
:func:`engine_progress` to whatever sink the progress-bar callback installed (:func:`set_status_sink`);
with no sink (library use without ``lit_dash.callbacks.RolloutProgress``) nothing is shown.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import time
import warnings
from collections.abc import Callable, Iterable, Iterator

VERBOSE_ENV = "LIT_DASH_VERBOSE"

# (message regex, module regex, why the line asks nothing of the user)
WARNING_FILTERS: tuple[tuple[str, str, str], ...] = (
    (
        r"`torch\.distributed\.reduce_op` is deprecated",
        r"vllm\.",
        "vLLM's own use of a deprecated torch alias, raised while it imports",
    ),
    (
        r"`isinstance\(treespec, LeafSpec\)` is deprecated",
        r"lightning\.",
        "Lightning 2.6 calling a pytree API torch 2.13 deprecated",
    ),
    (
        r"Found \d+ module\(s\) in eval mode at the start of training",
        r"lightning\.",
        "the policy trains in eval mode on purpose: transformers loads it so, which switches dropout off; "
        "vLLM never applies dropout, so the trainer's log-probs are those of the distribution the engine "
        "sampled from (the parity check and the PPO ratio compare the two)",
    ),
)

# logger -> messages (regex, matched at the start) dropped from that logger only, with the reason
LOG_FILTERS: dict[str, tuple[tuple[str, str], ...]] = {
    "lightning.pytorch.utilities.rank_zero": (
        (r"(GPU|TPU|HPU) available: ", "the device is in lit_dash's run summary"),
        (r"💡 Tip: ", "advertising for optional Lightning cloud packages"),
    ),
    "lightning.fabric.utilities.seed": ((r"Seed set to ", "the seed is in lit_dash's run summary"),),
}

# loggers raised to a level, with the reason
LOGGER_LEVELS: dict[str, tuple[int, str]] = {
    "vllm": (
        logging.ERROR,
        "vLLM's start-up warnings on CPU (Triton missing, enforce-eager, inductor, Model Runner V2, "
        "LD_PRELOAD tips, a global seed, set_num_threads after binding) describe its own choices",
    ),
}

# environment read by libraries before they start (setdefault: an explicit setting wins)
ENVIRONMENT: dict[str, str] = {
    # c10's own stderr warnings (vLLM's "NUMA binding: Using MEMBIND policy"); read when torch loads, so
    # only the CLI, which sets it before importing torch, can apply it. Warnings raised from Python calls
    # are Python warnings and unaffected.
    "TORCH_CPP_LOG_LEVEL": "ERROR",
}


def verbose() -> bool:
    """``LIT_DASH_VERBOSE`` is set to anything but empty / 0 / false: show every library line."""
    return os.environ.get(VERBOSE_ENV, "").strip().lower() not in ("", "0", "false", "no")


class _MessageFilter(logging.Filter):
    def __init__(self, patterns: Iterable[str]) -> None:
        super().__init__()
        self.pattern = re.compile("|".join(f"(?:{p})" for p in patterns))

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


def set_environment() -> None:
    """The environment part of :func:`quiet`; call before torch is imported."""
    if not verbose():
        for key, value in ENVIRONMENT.items():
            os.environ.setdefault(key, value)


def quiet() -> None:
    """Install every filter of this module (nothing under ``LIT_DASH_VERBOSE=1``). Safe to call often."""
    if verbose():
        return
    set_environment()
    for message, module, _ in WARNING_FILTERS:
        warnings.filterwarnings("ignore", message=message, module=module)
    for name, patterns in LOG_FILTERS.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _MessageFilter) for f in logger.filters):
            logger.addFilter(_MessageFilter(p for p, _ in patterns))
    for name, (level, _) in LOGGER_LEVELS.items():
        logging.getLogger(name).setLevel(level)
    try:
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover
        return
    hf_logging.disable_progress_bar()  # "Loading weights" bars for a model that loads in a second


# ---- progress within a phase ------------------------------------------------------------------------

# sink(label, done, total, elapsed_s); label None: the phase ended
StatusSink = Callable[[str | None, int, int, float], None]
_sink: StatusSink | None = None
_label: list[str] = []


def set_status_sink(sink: StatusSink | None) -> None:
    """Where phase progress goes (the progress-bar callback sets it on rank 0; None: nowhere)."""
    global _sink
    _sink = sink


@contextlib.contextmanager
def phase(label: str) -> Iterator[None]:
    """Name what engine calls inside this block are for (``"evaluating arithmetic"``); the default is
    ``"sampling"``."""
    _label.append(label)
    try:
        yield
    finally:
        _label.pop()


class _EngineProgress:
    """A tqdm stand-in for vLLM's ``use_tqdm`` callable: counts finished completions and reports them to
    the sink. vLLM also wraps its prompt rendering in one (an iterable, no total): passed through."""

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, **_: object) -> None:
        self.iterable = iterable
        self.total = total or 0
        self.n = 0
        self.postfix = None
        self._start = time.perf_counter()

    def __iter__(self):
        return iter(self.iterable or ())

    @property
    def format_dict(self) -> dict[str, float]:
        return {"elapsed": max(time.perf_counter() - self._start, 1e-9), "n": self.n, "total": self.total}

    def _report(self, label: str | None) -> None:
        if _sink is not None and self.iterable is None:
            _sink(label, self.n, self.total, time.perf_counter() - self._start)

    def update(self, n: int = 1) -> None:
        self.n += n
        self._report(_label[-1] if _label else "sampling")

    def refresh(self) -> None:
        pass

    def close(self) -> None:
        self._report(None)


def engine_progress() -> Callable[..., _EngineProgress] | bool:
    """What to pass as vLLM's ``use_tqdm``: a counter feeding the sink when one is installed, else
    False (no bar). Under ``LIT_DASH_VERBOSE`` with no sink, vLLM's own bar."""
    if _sink is not None:
        return _EngineProgress
    return verbose()


# ---- the run summary --------------------------------------------------------------------------------


def _dtype(value) -> str:
    return str(value).removeprefix("torch.")


def run_summary(trainer, pl_module, log_dir: str | None = None) -> str:
    """A short block of what this fit will do, once everything is resolved (an ``auto`` precision or
    prompts_per_rollout, the engine's dtype, the model): RolloutProgress prints it at fit start. Pass
    ``log_dir`` (``trainer.log_dir``, which every rank must ask for under DDP)."""
    from lit_dash.hardware import resolve_dtype

    hp = getattr(pl_module, "hparams", {})
    dm = trainer.datamodule
    lines = []
    policy = getattr(pl_module, "policy", None)
    model = getattr(pl_module, "model_name", type(pl_module).__name__)
    if policy is not None:
        params = sum(p.numel() for p in policy.parameters())
        trainable = sum(p.numel() for p in policy.parameters() if p.requires_grad)
        share = "all trainable" if trainable == params else f"{trainable / 1e6:.1f} M trainable"
        model += f" ({params / 1e6:.1f} M parameters, {share})"
    lines.append(f"model      {model}")
    engine = getattr(dm, "engine", None)
    if "precision" in hp:
        text = (
            f"trainer {_dtype(resolve_dtype(hp['precision'], pl_module.device))} on {pl_module.device.type}"
        )
        if engine is not None:
            kind = getattr(getattr(dm, "engine_config", None), "kind", type(engine).__name__)
            text += f", engine {kind} {_dtype(getattr(engine, 'dtype', '?'))}"
        lines.append(f"precision  {text}")
    group = getattr(dm, "group_size", None)
    prompts = getattr(dm, "prompts_per_rollout", None)
    if group is not None and prompts is not None:
        text = f"{prompts} prompts x {group} completions = {prompts * group} completions per rollout"
        sampling = getattr(dm, "sampling", None)
        if sampling is not None:
            text += f" (T {sampling.temperature}, up to {sampling.max_new_tokens} tokens)"
        lines.append(f"rollout    {text}")
        threshold = getattr(dm, "filter_threshold", None)
        filtering = f"|advantage| <= {threshold} dropped" if threshold is not None else "off"
        lines.append(f"batches    micro-batch {dm.micro_batch_size} completions; filter {filtering}")
    update = getattr(pl_module, "update_mode", None)
    per_rollout = int(getattr(pl_module, "steps_per_rollout", 1))
    if update is not None:
        lines.append(
            f"update     {update} ({per_rollout} optimizer step{'s' * (per_rollout > 1)} per rollout)"
        )
    if trainer.max_steps > 0:
        budget = f"{trainer.max_steps} optimizer steps"
        if per_rollout > 1:
            budget += f" = {trainer.max_steps // per_rollout} rollouts"
        if trainer.ckpt_path:
            budget += f", resuming from {trainer.ckpt_path}"
        lines.append(f"budget     {budget}")
    seed = getattr(pl_module, "seed", None)
    lines.append(f"seed       {seed if seed is not None else os.environ.get('PL_GLOBAL_SEED', 'not set')}")
    lines.append(f"run dir    {log_dir or trainer.default_root_dir}")
    return "[lit_dash] run summary\n" + "\n".join(f"  {line}" for line in lines)
