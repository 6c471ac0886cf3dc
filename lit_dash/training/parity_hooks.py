"""The parity guard's hooks on the LightningModule: the step's engine/trainer log-prob gap over all
ranks, the threshold for this precision and sampling, and the gap of a step that kept nothing.

A mixin of :class:`lit_dash.module.DashModule`; the arithmetic and the guard itself are in
:mod:`lit_dash.training.parity`. It uses the module's ``_parity`` (a :class:`~.parity.ParityGuard`),
``hparams``, ``_reduce_over_ranks``, ``_logprobs_of``, ``_compute_dtype`` and ``_add_time``.
"""

from __future__ import annotations

import functools
import time

from lit_dash.data.buffer import Rollout
from lit_dash.engines.base import Engine
from lit_dash.training import parity


class ParityHooks:
    """The parity guard, as the module's training step calls it."""

    @property
    def last_engine_gap(self) -> dict[str, float] | None:
        """The last step's parity figures (mean, max, tokens), or None when the engine gave no log-probs."""
        return self._parity.last_gap

    def _probe_gap(self, rollout: Rollout) -> parity.GapParts:
        """The parity gap of a step that kept nothing, on the rollout's probe micro-batch of dropped
        completions: one forward without backward, so the guard also watches steps that train on nothing
        (a stale engine's samples may be exactly the ones filtering drops)."""
        probe = rollout.parity_probe
        if probe is None or probe.engine_logprobs is None:
            return 0.0, 0.0, 0.0
        start = time.perf_counter()
        gap = parity.micro_batch_gaps([probe], {0: self._logprobs_of(self.policy, probe)}, self.device)
        self._add_time("ref_old_logprobs", time.perf_counter() - start)
        return gap

    def _engine(self) -> Engine | None:
        """The datamodule's engine: None outside a Trainer (or before the engine starts)."""
        return self.data.engine if self._trainer is not None and self.trainer.datamodule is not None else None

    def parity_threshold(self, rollout: Rollout | None = None) -> float:
        """model.parity_threshold, or the default for this trainer precision, the engine's dtype and the
        rollout's sampling (:func:`lit_dash.training.parity.threshold_for`)."""
        engine = self._engine()
        dtype = engine.dtype if engine is not None else None
        return parity.threshold_for(self.hparams.parity_threshold, self._compute_dtype(), dtype, rollout)

    def _check_parity(self, gap_sum: float, gap_max: float, gap_tokens: float, rollout: Rollout) -> dict:
        """The step's engine/trainer log-prob gap over all ranks (logged), and the guard on it."""
        gap_sum, gap_tokens = self._reduce_over_ranks([gap_sum, gap_tokens], "sum")
        (gap_max,) = self._reduce_over_ranks([gap_max], "max")
        threshold = self.parity_threshold(rollout) if gap_tokens else 0.0
        message = functools.partial(self._parity_message, rollout=rollout)
        return self._parity.check(
            (gap_sum, gap_max, gap_tokens), self.hparams.parity_check, threshold, message
        )

    def _parity_message(
        self, mean: float, gap_max: float, tokens: float, threshold: float, rollout: Rollout
    ) -> str:
        engine, is_set = self._engine(), self.hparams.parity_threshold is not None
        dtype, precision = engine.dtype if engine is not None else "unknown", self._compute_dtype()
        return parity.parity_message(
            self.global_step, mean, gap_max, tokens, threshold, is_set, rollout, precision, dtype
        )
