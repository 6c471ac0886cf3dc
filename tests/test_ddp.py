"""DDP through Lightning on the CPU (gloo): real ``lit_dash.cli`` runs with two ranks, each with its own
vLLM engine and its own share of the prompts. One fit of four steps serves the first three claims:

* one rank keeps nothing after filtering (step 4), yet both take the same optimizer steps and hold
  identical weights;
* a DDP step equals the one-process step on the union of the ranks' rollouts (replayed here from each
  rank's dumped rollout, from the same initial weights): the same gradient, weights and logged scalars;
* a rollout that no rank keeps anything of is a no-op step on every rank;
* evaluation scores each held-out problem once over the ranks and logs the whole set.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import lightning as L
import pytest
import torch
from support import cli_command, run_logged
from torch.utils.data import DataLoader, DistributedSampler

from lit_dash.data.buffer import Rollout

# the run: step 1 keeps nothing on any rank, steps 2 and 3 train on both, at step 4 rank 1 keeps nothing
STEPS = 4
EVAL_SET = "{arithmetic: {source: arithmetic, difficulty: add1, split: test, num_problems: 7}}"  # odd
# fp32, two ranks: DDP sums the ranks' gradients in another order than one process accumulates them
GRAD_RTOL = 1e-5  # of the gradient's largest entry
WEIGHT_ATOL = 1e-6  # AdamW's update is lr x g / (|g| + eps): a rounding-level g can move a weight lr x 1e-2


def _records(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _lit_dash(tmp_path: Path, subcommand: str, *args: str, name: str) -> None:
    """``lit_dash.cli <subcommand>`` on the tiny config with two CPU ranks (gloo)."""
    cmd = cli_command(
        subcommand,
        "--trainer.accelerator",
        "cpu",
        "--trainer.devices",
        "2",
        "--trainer.strategy",
        "ddp",
        "--trainer.default_root_dir",
        str(tmp_path),
        "--data.engine.kv_cache_gib",
        "0.25",
        *args,
    )
    run_logged(cmd, tmp_path / f"{name}.log")


# ---- the one DDP fit (four steps), and its replay: one process on the union of the ranks' rollouts ----


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory) -> Path:
    """Two ranks, four steps of the parity reward with filtering (the ranks keep different numbers of
    completions); every rank's first rollout scores 0 everywhere, so no rank keeps anything of it, and
    rank 1's fourth scores 0, so rank 1 alone keeps nothing. No gradient clipping: it would rescale both
    sides alike and hide a wrong normaliser."""
    tmp_path = tmp_path_factory.mktemp("ddp_replay")
    _lit_dash(
        tmp_path,
        "fit",
        "--model.class_path",
        "tiny_reward.NoRankThenRankOneKeepsNothing",
        "--model.max_grad_norm",
        "null",
        "--model.precision",
        "float32",
        "--data.engine.dtype",
        "float32",
        "--trainer.max_steps",
        str(STEPS),
        "--data.filter_threshold",
        "0.1",
        "--data.eval_sets",
        EVAL_SET,
        "--trainer.callbacks+=recorders.RolloutDump",
        f"--trainer.callbacks.path={tmp_path}/dump",
        "--trainer.callbacks+=recorders.WeightChecksum",
        f"--trainer.callbacks.path={tmp_path}/weights",
        "--trainer.callbacks+=recorders.PromptLog",
        f"--trainer.callbacks.path={tmp_path}/prompts",
        name="fit",
    )
    return tmp_path


def test_two_ranks_stay_in_step_when_one_keeps_nothing(ddp_run):
    rank0, rank1 = (_records(ddp_run / f"weights.rank{r}.jsonl") for r in (0, 1))
    assert [r["step"] for r in rank0] == [r["step"] for r in rank1] == list(range(1, STEPS + 1))
    alone0, alone1 = rank0[-1], rank1[-1]  # step 4: rank 1 scored every completion 0
    assert alone1["kept"] == 0 and alone1["micro_batches"] == 0, "rank 1's rewards are constant"
    assert alone0["kept"] > 0, "rank 0's parity reward gives mixed groups"
    # only step 1 (no rank kept anything) was a no-op; rank 0 kept completions at step 4, so not there
    assert alone0["skipped_steps"] == alone1["skipped_steps"] == 1
    for a, b in zip(rank0, rank1, strict=True):  # identical weights after every step ...
        assert a["sum"] == b["sum"] and a["weighted"] == b["weighted"], (a, b)
    assert rank1[-2]["weighted"] != alone1["weighted"], "... and rank 1 moved with rank 0's gradient"

    prompts0, prompts1 = (_records(ddp_run / f"prompts.rank{r}.jsonl") for r in (0, 1))
    seen0 = {i for r in prompts0 for i in r["ids"]}
    seen1 = {i for r in prompts1 for i in r["ids"]}
    assert seen0 and seen1 and not seen0 & seen1, "each rank draws from its own share of the prompts"


def _rollout(run: Path, rank: int, step: int) -> Rollout:
    """Rank ``rank``'s rollout of optimizer step ``step`` (1 is the first; logged at TensorBoard step 0)."""
    return torch.load(run / f"dump.rank{rank}.step{step}.rollout.pt", weights_only=False)


def _union(rollouts: list[Rollout]) -> Rollout:
    """One rollout holding every rank's completions and micro-batches, as one process would have sampled."""
    first = rollouts[0]
    micro_batches = [mb for r in rollouts for mb in r.micro_batches]
    probes = [r.parity_probe for r in rollouts if r.parity_probe is not None]
    return Rollout(
        problems=[p for r in rollouts for p in r.problems],
        prompt_token_ids=[ids for r in rollouts for ids in r.prompt_token_ids],
        completions=[c for r in rollouts for c in r.completions],
        rewards=torch.cat([r.rewards for r in rollouts]),
        advantages=torch.cat([r.advantages for r in rollouts]),
        kept=torch.cat([r.kept for r in rollouts]),
        micro_batches=micro_batches,
        group_size=first.group_size,
        max_new_tokens=first.max_new_tokens,
        engine_calls=sum(r.engine_calls for r in rollouts),
        temperature=first.temperature,
        top_k=first.top_k,
        top_p=first.top_p,
        parity_probe=probes[0] if probes else None,
    )


class _NoEngine:
    dtype = torch.float32

    def load_weights(self, weights) -> None:
        for _ in weights:
            pass


class _ReplayData(L.LightningDataModule):
    """Hands the training step the given rollouts in order instead of sampling."""

    def __init__(self, rollouts: list[Rollout]) -> None:
        super().__init__()
        from lit_dash.engines.base import SamplingConfig

        self.rollouts = list(rollouts)
        self.sampling = SamplingConfig(temperature=1.0, max_new_tokens=rollouts[0].max_new_tokens)
        self.engine = _NoEngine()
        self.evaluators = {}
        self.skipped_long_prompts = 0

    def train_dataloader(self):
        return DataLoader([[] for _ in self.rollouts], batch_size=None)

    def rollout(self, problems, reward_fn) -> Rollout:
        return self.rollouts.pop(0)


class _Capture(L.Callback):
    def __init__(self) -> None:
        self.logged: list[dict[str, float]] = []
        self.grads: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.grads.append(
            {n: p.grad.detach().clone() for n, p in pl_module.policy.named_parameters() if p.grad is not None}
        )

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        metrics = trainer.callback_metrics
        self.logged.append({k: float(v) for k, v in metrics.items() if k.startswith("train/")})


def _replay(rollouts: list[Rollout]) -> tuple[dict[str, torch.Tensor], _Capture]:
    """One process, the same module knobs and initial weights as the DDP run, trained on ``rollouts``."""
    from lit_dash.module import DashModule

    module = DashModule(model="tiny-llama", lr=1.0e-4, max_grad_norm=None, precision="float32")
    capture = _Capture()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=len(rollouts),
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[capture],
    )
    trainer.fit(module, datamodule=_ReplayData(rollouts))
    return {n: p.detach().clone() for n, p in module.policy.named_parameters()}, capture


@pytest.fixture(scope="module")
def replays(ddp_run):
    union = _replay([_union([_rollout(ddp_run, r, s) for r in (0, 1)]) for s in range(1, STEPS + 1)])
    rank0_only = _replay([_rollout(ddp_run, 0, s) for s in range(1, STEPS + 1)])
    return union, rank0_only


def _initial_weights() -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM

    from lit_dash.models import resolve_model

    model = AutoModelForCausalLM.from_pretrained(resolve_model("tiny-llama"), dtype=torch.float32)
    return {n: p.detach() for n, p in model.named_parameters()}


def _largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def _largest_entry(a: dict[str, torch.Tensor]) -> float:
    return max(float(t.abs().max()) for t in a.values())


def test_a_rollout_no_rank_keeps_anything_of_is_a_no_op_step_everywhere(ddp_run):
    from lit_dash.logs import read_scalars

    assert all(_rollout(ddp_run, r, 1).num_kept == 0 for r in (0, 1)), "the first rollout scores 0 everywhere"
    assert all(_rollout(ddp_run, r, 2).num_kept > 0 for r in (0, 1)), "later ones are parity-rewarded"
    skipped = dict(read_scalars(ddp_run, "train/skipped_steps")["train/skipped_steps"])
    assert skipped == dict.fromkeys(range(STEPS), 1.0), "one skipped step, the one taken on nothing"
    initial = _initial_weights()
    after_first = torch.load(ddp_run / "dump.step1.weights.pt")
    assert all(torch.equal(after_first[n], initial[n]) for n in initial), "bit-equal to the initial weights"
    assert torch.load(ddp_run / "dump.step1.grads.pt") == {}, "no parameter got a gradient"
    after_second = torch.load(ddp_run / "dump.step2.weights.pt")  # control: a step that trains moves them
    assert _largest_difference(after_second, initial) > 1e-5


def test_a_ddp_step_is_the_one_process_step_on_the_union_of_the_rollouts(ddp_run, replays):
    (union_weights, union), (rank0_weights, rank0) = replays
    ddp_weights = torch.load(ddp_run / f"dump.step{STEPS}.weights.pt")
    assert len(union.grads) == STEPS
    assert torch.load(ddp_run / "dump.step1.grads.pt") == union.grads[0] == {}, "step 1: no gradient at all"
    for step, replayed in zip(range(2, STEPS + 1), union.grads[1:], strict=True):
        ddp = torch.load(ddp_run / f"dump.step{step}.grads.pt")
        scale = _largest_entry(ddp)
        diff = _largest_difference(ddp, replayed)
        print(f"step {step}: largest gradient entry {scale:.3e}, largest DDP - replay difference {diff:.3e}")
        assert diff <= GRAD_RTOL * scale
        # control: the gradient a missing world-size factor gives (DDP's mean of unscaled rank losses)
        half = {n: g / 2 for n, g in replayed.items()}
        assert _largest_difference(ddp, half) > 100 * GRAD_RTOL * scale
    weight_diff = _largest_difference(ddp_weights, union_weights)
    print(f"after {STEPS} steps: largest |DDP - union replay| weight difference {weight_diff:.3e}")
    assert weight_diff <= WEIGHT_ATOL
    # control: replaying rank 0's rollouts alone is another update
    control = _largest_difference(ddp_weights, rank0_weights)
    print(f"after {STEPS} steps: largest |DDP - rank 0 replay| weight difference {control:.3e}")
    assert control > 20 * WEIGHT_ATOL


def test_logged_train_scalars_are_the_worlds(ddp_run, replays):
    from lit_dash.logs import read_scalars

    (_, union), (_, rank0) = replays
    logged = read_scalars(ddp_run, "train/")
    assert len(union.logged) == STEPS
    for step, replayed in enumerate(union.logged):
        ddp = {tag: dict(points)[step] for tag, points in logged.items() if step in dict(points)}
        assert set(replayed) == set(ddp), set(replayed) ^ set(ddp)
        # a rank that keeps nothing measures parity on its probe in DDP; the union has micro-batches (or,
        # at a no-op step, one rank's probe)
        keeps_nothing = any(_rollout(ddp_run, r, step + 1).num_kept == 0 for r in (0, 1))
        skip = {"train/engine_logprob_gap", "train/engine_logprob_gap_max"} if keeps_nothing else set()
        for tag in sorted(set(replayed) - skip):
            assert ddp[tag] == pytest.approx(replayed[tag], rel=1e-5, abs=1e-6, nan_ok=True), (step, tag)
        both = [_rollout(ddp_run, r, step + 1) for r in (0, 1)]  # by hand, from the dumped rollouts
        rewards = torch.cat([r.rewards for r in both])
        lengths = [len(c.token_ids) for r in both for c in r.completions]
        assert ddp["train/reward_mean"] == pytest.approx(float(rewards.mean()), rel=1e-6)
        assert ddp["train/kept_completions"] == sum(r.num_kept for r in both)
        assert ddp["train/kept_fraction"] == pytest.approx(sum(r.num_kept for r in both) / len(rewards))
        assert ddp["train/completion_tokens_mean"] == pytest.approx(sum(lengths) / len(lengths), rel=1e-6)
        assert ddp["train/completion_tokens_max"] == max(lengths)
    # control: rank 0's own figures (what was logged before) differ from the world's
    differs = [
        tag
        for step, alone in enumerate(rank0.logged)
        for tag in ("train/reward_mean", "train/kept_completions", "train/entropy", "train/loss")
        if alone[tag] != pytest.approx(union.logged[step][tag], rel=1e-3)
    ]
    assert {"train/reward_mean", "train/kept_completions", "train/loss"} <= set(differs), differs
    # the random tiny model is near uniform: the entropy per token is close to log(vocab), where one
    # rank's token sum over the world's tokens (what was logged before) is about half of it
    from transformers import AutoConfig

    from lit_dash.models import resolve_model

    log_vocab = math.log(AutoConfig.from_pretrained(resolve_model("tiny-llama")).vocab_size)
    for step in (1, 2):
        assert 0.95 * log_vocab < dict(logged["train/entropy"])[step] <= log_vocab


# ---- evaluation over ranks --------------------------------------------------------------------------


def _one_process_eval(tiny_engine, reward) -> list[dict]:
    """The eval set scored in one process (the session's fp32 engine) with ``reward`` (a module class)."""
    from lit_dash.data.datamodule import ProblemSource
    from lit_dash.evaluation import Evaluator

    problems = ProblemSource(source="arithmetic", difficulty="add1", split="test", num_problems=7).load()
    evaluator = Evaluator("arithmetic", problems, "chat", 16, instruction="Answer in one line.")
    return evaluator.records(tiny_engine, lambda texts, problems: reward.reward(None, texts, problems))


def _same_records(ddp: list[dict], one: list[dict]) -> None:
    assert [r["source_id"] for r in ddp] == [r["source_id"] for r in one], "each problem once, in order"
    assert [r["completion"] for r in ddp] == [r["completion"] for r in one]
    assert [r["reward"] for r in ddp] == [r["reward"] for r in one]


def test_evaluation_on_two_ranks_scores_each_problem_once(tmp_path, ddp_run, tiny_engine):
    from tiny_reward import AnswerParityModule, ParityRewardModule

    from lit_dash.logs import find_log_dir, read_scalars

    one = _one_process_eval(tiny_engine, AnswerParityModule)
    accuracy = sum(r["reward"] >= 1.0 for r in one) / len(one)
    assert 0 < accuracy < 1, "some answers are even, not all"
    # control: Lightning's default sampler would pad 7 problems to 8 on 2 ranks (a duplicate)
    assert sum(len(DistributedSampler(range(7), num_replicas=2, rank=r)) for r in (0, 1)) == 8

    _lit_dash(
        tmp_path,
        "validate",
        "--model.class_path",
        "tiny_reward.AnswerParityModule",
        "--data.engine.dtype",
        "float32",
        "--trainer.limit_val_batches",
        "1.0",
        "--data.eval_batch_size",
        "2",
        "--data.eval_sets",
        EVAL_SET,
        name="validate",
    )
    log_dir = find_log_dir(tmp_path)
    _same_records(_records(log_dir / "eval" / "arithmetic_validate_step0.jsonl"), one)
    logged = read_scalars(log_dir, "eval/")
    assert [v for _, v in logged["eval/arithmetic/accuracy"]] == [pytest.approx(accuracy)]

    # the evaluation callback during the DDP fit, at step 0 (the initial weights): the same records
    fit_dir = find_log_dir(ddp_run)
    _same_records(
        _records(fit_dir / "eval" / "arithmetic_fit_step0.jsonl"),
        _one_process_eval(tiny_engine, ParityRewardModule),
    )
    for step in range(STEPS + 1):  # every evaluation of the fit scored the 7 problems once
        ids = [r["source_id"] for r in _records(fit_dir / "eval" / f"arithmetic_fit_step{step}.jsonl")]
        assert len(ids) == len(set(ids)) == 7
