#!/usr/bin/env bash
# GPU check of the vLLM engine (issue 5): run on a CUDA machine with no network.
#   bash bench/gpu_check.sh            # needs: pip install -e './client[torch]' -e './services[vllm]'
# Builds a random-initialised ~0.6B Qwen2.5-0.5B-shaped Llama checkpoint on the box (bfloat16,
# by our code), then scores the same work on the torch and vLLM engines: 64 sequences of 1,024
# tokens, the last 256 scored (span), top-k 0 and 20; prints tokens scored/s, the ratio and the
# agreement (max |logprob difference|); then groups of 8 completions of one prompt (issue 12): the
# torch engine (prefix-shared) and the vLLM engine without / with OPD_VLLM_PREFIX_CACHE (the flag's
# GPU path), which must agree. Not run in the sessions that wrote it (no GPU lent).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, vllm; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| vllm', vllm.__version__)"
exec "$PY" bench/gpu_check.py "$@"
