#!/usr/bin/env bash
# GPU check of the vLLM engine (issue 5): run on a CUDA machine with no network.
#   bash bench/gpu_check.sh            # needs: pip install -e './client[torch]' -e './services[vllm]'
# Builds a random-initialised ~0.6B Qwen2.5-0.5B-shaped Llama checkpoint on the box (bfloat16,
# by our code), then scores the same work on the torch and vLLM engines: 64 sequences of 1,024
# tokens, the last 256 scored (span), top-k 0 and 20; prints tokens scored/s, the ratio and the
# agreement (max |logprob difference|); then groups of 8 completions of one prompt (issue 12): the
# torch engine (prefix-shared) and the vLLM engine without / with OPD_VLLM_PREFIX_CACHE (the flag's
# GPU path), which must agree. Not run in the sessions that wrote it (no GPU lent).
# Also builds the GPU image first when docker or podman is present (see below).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
"$PY" -c "import torch, vllm; print('torch', torch.__version__, 'cuda', torch.version.cuda, '| vllm', vllm.__version__)"
# The GPU image (docker/Dockerfile.gpu on the pinned vllm/vllm-openai tag), when a container
# engine is here: built and imported once, before the bench. Its base comes from Docker Hub
# (~10 GB): offline, the build fails and the bench still runs. SKIP_GPU_IMAGE=1 skips it.
ENGINE=$(command -v docker || command -v podman || true)
if [ -n "$ENGINE" ] && [ -z "${SKIP_GPU_IMAGE:-}" ]; then
  if "$ENGINE" build -f docker/Dockerfile.gpu -t opd-teacher-vllm:0.1.0 .; then
    "$ENGINE" run --rm --entrypoint python3 opd-teacher-vllm:0.1.0 -c \
      "import torch, vllm, opd_services; print('GPU image built: torch', torch.__version__, 'vllm', vllm.__version__)"
  else
    echo "GPU image: build FAILED (see above); continuing with the bench"
  fi
else
  echo "GPU image: not built (no docker or podman here, or SKIP_GPU_IMAGE set)"
fi
exec "$PY" bench/gpu_check.py "$@"
