# The two commands a newcomer needs: `make demo` and `make test`. Both set up .venv first.
.PHONY: setup demo test lint

setup:
	bash scripts/setup.sh

demo: setup
	.venv/bin/lit-dash fit --config configs/demo.yaml

test: setup
	.venv/bin/python -m pytest -q

lint: setup
	.venv/bin/ruff check lit_dash tests benchmarks
