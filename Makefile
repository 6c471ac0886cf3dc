# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first.
.PHONY: setup demo test test-fast lint bench compare

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/lit-dash fit --config configs/demo.yaml
	@model=$$(ls -td runs/demo/lightning_logs/version_*/export | head -1); \
	echo "[demo] the trained model, a transformers folder vLLM loads: $$model"; \
	echo "[demo] evaluate it: .venv/bin/python scripts/independent_check.py --model $$model"

test: setup
	.venv/bin/python -m pytest -q

test-fast: setup  # the tier to iterate with: no fit, CLI run, subprocess or 135M model (tests/tiers.py)
	.venv/bin/python -m pytest -q -m "not slow"

lint: setup
	.venv/bin/ruff check lit_dash tests benchmarks

bench: setup  # DASH vs standard GRPO, four settings side by side (~15 min on 2 CPU cores)
	.venv/bin/python benchmarks/dash_vs_grpo.py

compare: setup  # base, SFT, DASH, DASH without KL, PPO multi/mini, 16 steps, 2 seeds (37 min on 2 bf16-native CPU cores)
	.venv/bin/python benchmarks/compare_methods.py
