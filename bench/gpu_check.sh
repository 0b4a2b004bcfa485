#!/usr/bin/env bash
# What to run when a CUDA GPU is at hand (issue 11, "Ready for a GPU"); the README's
# "Your own model, prompts and reward model" section says what it showed, or that it has not run.
#
#   bash bench/gpu_check.sh            # from the repository root, with .venv (or PYTHON=...)
#
# 1. The vLLM checks: tests/test_vllm_backend.py (slow ones included), bench/vllm_parity.py,
#    bench/generate_backends.py and bench/online_vs_trl.py --rollout vllm, all on SmolLM2.
# 2. The walkthrough (pipelines/byo/reward_model.yaml, exported, then pipelines/byo_iterative_dpo.yaml)
#    with dtype: auto (bfloat16 on a GPU that has it) and the vLLM backend for generate and evaluate.
# 3. The DPO bench on SmolLM2 in bfloat16 (peak memory against float32), then against trl.
# First, bench/gpu_core_check.py: log-probs per architecture in float32, bfloat16 and under autocast on
# the GPU against a float32 CPU reference (needs only torch and transformers; runs where vLLM does not).
# Everything it keeps lives under ALIGNFLOW_HOME (default: a fresh temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
export ALIGNFLOW_HOME=${ALIGNFLOW_HOME:-$(mktemp -d -t alignflow-gpu-XXXX)}
echo "ALIGNFLOW_HOME=$ALIGNFLOW_HOME"
"$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'no CUDA GPU: this check is for a GPU machine')"
"$PY" bench/gpu_core_check.py
# vLLM lives in its own environment, <venv>-vllm (scripts/install_vllm.sh; `make setup` makes it with
# the CUDA build of vllm on an NVIDIA machine); tasks/vllm_env.py finds it as the pipelines do.
VLLM_PY=${ALIGNFLOW_VLLM_PYTHON:-.venv-vllm/bin/python}
"$VLLM_PY" -c "import vllm" 2>/dev/null || { echo "vLLM is not installed: make setup (or bash scripts/install_vllm.sh .venv-vllm)"; exit 1; }
export ALIGNFLOW_VLLM_PYTHON="$VLLM_PY"
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader

# The vLLM checks this CPU runs, on the GPU: the backend's tests (generate, evaluate with LoRA and
# judge_lm, the online stages' weight sync), sampling parity with hf, and the two vLLM benches.
"$PY" -m pytest -q -n 0 -m "slow or not slow" tests/test_vllm_backend.py
"$PY" bench/vllm_parity.py --model smollm2
"$PY" bench/generate_backends.py --model smollm2
"$PY" bench/online_vs_trl.py --model smollm2 --rollout vllm

alignflow() { "$PY" -m flows.cli "$@"; }
RM="$ALIGNFLOW_HOME/byo_rm"
# dtype: auto (the default, spelled out): the weights stored in bfloat16, training autocast to it.
AUTO=(--set models.base.dtype=auto)
time alignflow run pipelines/byo/reward_model.yaml "${AUTO[@]}" --set stages.reward_model.dtype=auto
alignflow export pipelines/byo/reward_model.yaml reward_model "$RM" --overwrite
WALK=("${AUTO[@]}" --set stages.dpo.dtype=auto --set "models.rm.path=$RM" --set models.rm.dtype=auto
      --set stages.generate.backend=vllm --set stages.evaluate.backend=vllm)
time alignflow run pipelines/byo_iterative_dpo.yaml "${WALK[@]}"
alignflow compare pipelines/byo_iterative_dpo.yaml -m 'win_rate*' -m 'reward_*'

# The DPO bench in bfloat16: bench/precision_memory.py (bfloat16 against float32 peak memory on
# SmolLM2 DPO) where it exists, then ours against trl on the GPU.
if [ -f bench/precision_memory.py ]; then
    "$PY" bench/precision_memory.py
fi
"$PY" bench/dpo_vs_trl.py --model smollm2 --lora
