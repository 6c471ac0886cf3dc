"""benchmarks/compare_methods.py: every method's generated config parses, and all share one sample budget."""

from __future__ import annotations

import importlib.util
import sys

import pytest
import yaml
from support import REPO

from lit_dash.cli import check_config
from lit_dash.module import DashModule
from lit_dash.sft import SftModule

sys.path.insert(0, str(REPO / "benchmarks"))  # the script imports its neighbours, as when run from there
_spec = importlib.util.spec_from_file_location("compare_methods", REPO / "benchmarks" / "compare_methods.py")
compare_methods = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(compare_methods)


@pytest.mark.parametrize("method", list(compare_methods.METHODS))
def test_each_method_config_parses_with_the_shared_budget(method, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    args = compare_methods.parse_args(["--steps", "5", "--eval-problems", "7", "--model", "tiny-llama"])
    cfg = compare_methods.run_config(method, 3, args, tmp_path)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    init = check_config(str(path))
    model, data = init.model, init.data
    assert init.seed_everything == 3 and model.hparams.model == "tiny-llama"
    assert [s.num_problems for s in data.eval_sources.values()] == [7]
    assert data.prompts_per_rollout == 12  # the demo's problems per step, for every method
    expected = {
        "base": (DashModule, 0.0, "dash"),
        "sft": (SftModule, 0.0, "dash"),
        "dash": (DashModule, 0.04, "dash"),
        "dash_no_kl": (DashModule, 0.0, "dash"),
        "ppo_multi": (DashModule, 0.04, "multi"),
        "ppo_mini": (DashModule, 0.04, "mini"),
    }[method]
    assert (type(model), model.kl_coef, model.update_mode) == expected
    if method == "base":
        assert init.trainer.limit_val_batches == 1.0
        return
    # equal sample budget: exactly 5 batches of problems; the optimizer-step cap is 5 x steps per rollout
    per_rollout = 2 if method.startswith("ppo") else 1
    assert (init.trainer.limit_train_batches, init.trainer.max_epochs) == (5, 1)
    assert init.trainer.max_steps == 5 * per_rollout
    evaluation = init.trainer.callbacks[0]
    assert evaluation.every_n_steps == 4 * per_rollout and not evaluation.at_start  # every 4 rollouts


def test_bad_flags_are_refused_by_name():
    with pytest.raises(SystemExit):
        compare_methods.parse_args(["--methods", "dash,grpo"])
