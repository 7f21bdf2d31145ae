# OPD Teacher. The two commands a new user needs: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test tools serve bench proto dashboard clean

$(STAMP): client/pyproject.toml services/pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) (set PY=python3.x)"; exit 1; }
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e './client[dev,torch]' -e './services[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/opd demo

test: $(STAMP) tools
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

# Validators for tests/deploy that are not Python packages: promtool (Debian `prometheus`) and
# docker-compose, installed with apt-get when missing and running as root (CI); otherwise, and
# if apt fails, their tests skip saying how. kubectl (its embedded kustomize renders k8s/) comes
# with the machine image; Debian's kubernetes-client (1.20, kustomize v2) is too old for
# kustomize components, so it is not a fallback.
TOOLS_APT := $(if $(shell command -v promtool),,prometheus) \
             $(if $(shell command -v docker-compose),,docker-compose)
tools:
	@if [ -n "$(strip $(TOOLS_APT))" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing deploy validators: $(strip $(TOOLS_APT))"; \
	    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
	        $(strip $(TOOLS_APT)) >/dev/null; } || echo "WARNING: apt-get failed; tests/deploy will skip what needs them"; \
	  else echo "NOTE: missing $(strip $(TOOLS_APT)) (apt-get install them as root); tests/deploy will skip what needs them"; fi; \
	fi

serve: $(STAMP)
	$(BIN)/opd serve

bench: $(STAMP)
	$(BIN)/python bench/scoring.py
	$(BIN)/python bench/queue.py
	$(BIN)/python bench/distill.py

# Regenerate the committed Grafana dashboard JSON (a test checks it is fresh).
dashboard:
	python3 monitoring/grafana/dashboard.py

# Regenerate the committed gRPC stubs (a test checks they are fresh).
proto: $(STAMP)
	$(BIN)/python client/opd_client/_proto/generate.py

clean:
	rm -rf $(VENV) .pytest_cache
