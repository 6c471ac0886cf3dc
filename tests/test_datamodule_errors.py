"""The data module's refusals, each with the message that names what to fix and a control that passes:
an eval set smaller than the world, ``validate`` with no eval sets, a bad ``predict_file``, every training
prompt longer than ``max_prompt_tokens``. No fit: a Trainer that is never launched gives the world size, and
the session engine the tokenizer."""

from __future__ import annotations

import lightning as L
import pytest
from tiny_reward import ParityRewardModule

from lit_dash.data.datamodule import ProblemSource, RolloutDataModule
from lit_dash.data.sources import DataError, arithmetic_problems
from lit_dash.evaluation import Evaluator

ADD1 = ProblemSource(source="arithmetic", difficulty="add1", num_problems=6)


def _evaluator(n: int) -> Evaluator:
    return Evaluator("tiny", arithmetic_problems(n, seed=1), "chat", 8, batch_size=8, instruction="")


def _quiet_trainer(**kwargs) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False, **kwargs
    )


def test_an_eval_set_smaller_than_the_world_is_refused_and_one_as_large_is_shared_out():
    trainer = _quiet_trainer(devices=3, strategy="ddp")  # never launched: world size 3, this is rank 0
    data = RolloutDataModule()
    data.trainer = trainer
    data.evaluators = {"tiny": _evaluator(2)}
    with pytest.raises(
        DataError,
        match="eval set 'tiny' has 2 problems, fewer than the 3 ranks: every rank needs one; add problems "
        "or validate on fewer devices",
    ):
        data.val_dataloader()
    data.evaluators = {"tiny": _evaluator(4)}  # control: 4 problems over 3 ranks, rank 0's share is 0 and 3
    (loader,) = data.val_dataloader()
    assert list(loader.sampler) == [0, 3]


def test_validate_without_eval_sets_is_refused_while_fit_skips_validation(tiny_engine):
    module = ParityRewardModule(model="tiny-llama")
    data = RolloutDataModule(train=ADD1, eval_sets={})
    data.engine = tiny_engine
    trainer = _quiet_trainer(devices=1)
    with pytest.raises(DataError, match=r"validation needs at least one entry in data\.eval_sets"):
        trainer.validate(module, datamodule=data)
    trainer.state.fn = "fit"  # control: a fit with no held-out sets gets no validation loaders instead
    assert data.val_dataloader() == []


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (None, r"predict needs data\.predict_file: a JSONL file with a question per line"),
        ("missing", r"data file not found: .*missing\.jsonl; pass a local JSONL path or a hub id"),
        (
            '{"question": "What is 1 + 1?"}\n{"prompt": "2 + 2"}\n',
            r'prompts\.jsonl: line 2 has no "question" string',
        ),
        (
            '{"question": "What is 1 + 1?"}\n{"question": 7}\n',
            r'prompts\.jsonl: line 2 has no "question" string',
        ),
        ('{"question": "What is 1 + 1?"}\n{"question": "2 +\n', r"prompts\.jsonl:2: not valid JSON"),
        ('["What is 1 + 1?"]\n', r"prompts\.jsonl:1: expected a JSON object per line, got list"),
    ],
    ids=["unset", "missing", "no-question", "not-a-string", "bad-json", "not-an-object"],
)
def test_a_bad_predict_file_is_refused_before_the_engine_starts(tmp_path, content, match):
    path = None
    if content == "missing":
        path = tmp_path / "missing.jsonl"
    elif content is not None:
        path = tmp_path / "prompts.jsonl"
        path.write_text(content)
    data = RolloutDataModule(predict_file=None if path is None else str(path))
    with pytest.raises(DataError, match=match):
        data.setup("predict")  # no trainer: it fails before it could reach for one to start the engine
    assert data.engine is None


def test_a_good_predict_file_gives_its_questions_and_answers(tmp_path):
    """The control of the refusals above: the same reader on a well-formed file."""
    path = tmp_path / "prompts.jsonl"
    path.write_text('{"question": "What is 2 + 3?", "answer": 5}\n\n{"question": "What is 1 + 1?"}\n')
    (loader,) = [RolloutDataModule(predict_file=str(path)).predict_dataloader()]
    (batch,) = list(loader)
    assert [(p.question, p.answer) for p in batch] == [("What is 2 + 3?", "5"), ("What is 1 + 1?", "")]
    assert [p.source_id for p in batch] == [f"{path}:1", f"{path}:2"]  # blank lines are not counted


def test_every_training_prompt_too_long_is_refused_one_token_below_their_length(tiny_engine, recwarn):
    """add1's questions are all 8 tokens ("What is 3 + 5?", raw, no instruction): at max_prompt_tokens 7 none is left and
    setup says so; at 8 (the control) every one is kept and nothing is skipped or warned about. (A partial
    skip's warning is tested in test_console.)"""
    problems = ADD1.load()
    lengths = {
        len(tiny_engine.tokenizer(p.question, add_special_tokens=False)["input_ids"]) for p in problems
    }
    assert lengths == {8}
    data = RolloutDataModule(
        train=ADD1, eval_sets={}, prompt_style="raw", instruction="", max_prompt_tokens=7
    )
    data.engine = tiny_engine
    with pytest.raises(DataError, match=r"^every training prompt is longer than max_prompt_tokens=7$"):
        data.setup("fit")
    assert [str(w.message) for w in recwarn if "training prompts longer than" in str(w.message)] == [
        "skipped 6 of 6 training prompts longer than max_prompt_tokens=7"
    ]
    recwarn.clear()
    data = RolloutDataModule(
        train=ADD1, eval_sets={}, prompt_style="raw", instruction="", max_prompt_tokens=8
    )
    data.engine = tiny_engine
    data.setup("fit")
    assert data.skipped_long_prompts == 0 and len(data.train_problems) == 6
    assert not [w for w in recwarn if "training prompts longer than" in str(w.message)]
