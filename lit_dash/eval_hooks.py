"""``lit-dash validate / test / predict``: the module's Lightning hooks for them, as a mixin of
:class:`lit_dash.module.DashModule`.

A concern of its own: the eval sets' records, each rank scoring its share (the dataloader's unrepeated
sampler), gathered so every rank holds each set once, summarised, written as JSONL beside the logs and
logged. The records come from :class:`lit_dash.evaluation.Evaluator`, the same code the evaluation
callback runs during fit, so the numbers mean the same in both places.
"""

from __future__ import annotations

import lightning as L
from lightning.pytorch.utilities import rank_zero_info

from lit_dash.contract import RolloutData
from lit_dash.data.records import Problem
from lit_dash.evaluation import EvalResult, Evaluator, summarize, write_jsonl
from lit_dash.training import distributed


class EvalHooks(L.LightningModule):
    """validation_step / test_step / predict_step and their epoch ends. Needs ``data`` (the datamodule
    as :class:`~lit_dash.contract.RolloutData`), ``reward`` and ``hparams.answer_fallback``."""

    data: RolloutData
    _val_records: dict[str, list[dict]]
    _predictions: list[dict]

    def validation_step(self, problems: list[Problem], batch_idx: int, dataloader_idx: int = 0) -> None:
        dm = self.data
        name = list(dm.evaluators)[dataloader_idx]
        records = dm.evaluators[name].score_batch(dm.engine, problems, self.reward)
        self._val_records.setdefault(name, []).extend(records)

    def on_validation_epoch_end(self) -> None:
        self._log_eval_epoch(tag="validate", prefix="eval")

    def test_step(self, problems: list[Problem], batch_idx: int, dataloader_idx: int = 0) -> None:
        """``lit-dash test``: the eval sets, scored as in validation, logged as ``test/<set>/...``."""
        self.validation_step(problems, batch_idx, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._log_eval_epoch(tag="test", prefix="test")

    def _log_eval_epoch(self, tag: str, prefix: str) -> None:
        # each rank scored its own share of every set; gathered, every rank logs the same values
        records = {
            name: self._gather_shares(self._val_records.get(name, [])) for name in self.data.evaluators
        }
        records = {name: rs for name, rs in records.items() if rs}  # a set no batch of which ran
        for result in self.collect_eval_results(records, tag=tag):
            for key, value in result.metrics(prefix).items():
                # equal on every rank: max is an exact no-op reduction (and keeps Lightning from warning)
                self.log(key, value, add_dataloader_idx=False, batch_size=1, sync_dist=True, reduce_fx="max")
        self._val_records = {}

    def _gather_shares(self, records: list[dict]) -> list[dict]:
        return distributed.gather_shares(self._trainer, records)

    def collect_eval_results(self, records_by_set: dict[str, list[dict]], tag: str) -> list[EvalResult]:
        """Summarise evaluation records (each set whole, every rank's share gathered) and write them as
        JSONL next to the logs (rank 0)."""
        results = []
        log_dir = self.trainer.log_dir if self.trainer is not None and self.trainer.log_dir else "."
        for name, records in records_by_set.items():
            if self.trainer is None or self.trainer.is_global_zero:  # ranks share the file name
                write_jsonl(records, f"{log_dir}/eval/{name}_{tag}_step{self.global_step}.jsonl")
            results.append(summarize(name, records))
        return results

    def predict_step(self, problems: list[Problem], batch_idx: int, dataloader_idx: int = 0) -> list[dict]:
        """``lit-dash predict``: one greedy completion per prompt of ``data.predict_file`` (the eval
        sampling: temperature 0, ``eval_max_new_tokens``); problems with an ``answer`` are scored too."""
        dm = self.data
        evaluator = Evaluator(
            "predict", [], dm.prompt_style, dm.eval_max_new_tokens, instruction=dm.instruction,
            last_number_fallback=self.hparams.answer_fallback,
        )  # fmt: skip
        records = evaluator.predict_batch(dm.engine, problems, self.reward)
        self._predictions.extend(records)
        return records

    def on_predict_epoch_end(self) -> None:
        log_dir = self.trainer.log_dir or self.trainer.default_root_dir
        if self.trainer.is_global_zero:
            path = write_jsonl(self._predictions, f"{log_dir}/predictions.jsonl")
            rank_zero_info(f"[lit_dash] {len(self._predictions)} completions written to {path}")
        self._predictions = []
