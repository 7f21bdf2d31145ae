# OPD Teacher. The two commands a new user needs: `make demo` and `make test`.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test serve bench proto clean

$(STAMP): client/pyproject.toml services/pyproject.toml
	@command -v $(PY) >/dev/null || { echo "need $(PY) (set PY=python3.x)"; exit 1; }
	test -d $(VENV) || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e './client[dev,torch]' -e './services[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/opd demo

test: $(STAMP)
	$(BIN)/python -m pytest -q $(PYTEST_ARGS)

serve: $(STAMP)
	$(BIN)/opd serve

bench: $(STAMP)
	$(BIN)/python bench/scoring.py
	$(BIN)/python bench/queue.py
	$(BIN)/python bench/distill.py

# Regenerate the committed gRPC stubs (a test checks they are fresh).
proto: $(STAMP)
	$(BIN)/python client/opd_client/_proto/generate.py

clean:
	rm -rf $(VENV) .pytest_cache
