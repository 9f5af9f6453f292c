# Two commands do everything on a fresh machine: `make demo` and `make test`.
# Each creates the virtual environment on first use (python3 -m venv + pip).

VENV       ?= .venv
PYTHON     ?= python3
PY         := $(VENV)/bin/python
# timm needs torchvision: torch 2.14.1 + torchvision 0.29.1 is a matching pair (on GPU machines
# pip picks the platform's CUDA build of the same pair).
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
EXTRAS     ?= test,export,cohort,dev
DEMO_DIR   ?= demo-out
PYTEST_ARGS ?=

.PHONY: setup demo test kernels-check lint bench-smoke clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet $(TORCH_SPEC)
	$(PY) -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: setup
	$(VENV)/bin/fastinsight demo $(DEMO_DIR)

test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile $(PYTEST_ARGS)

# Every Triton kernel configuration compiled ahead of time for Ampere and Hopper (no GPU
# needed); fails on a compile error or a register spill inside a loop.
kernels-check: setup
	$(VENV)/bin/fastinsight kernels check --arch sm_80,sm_90

lint: setup
	$(VENV)/bin/ruff check fastinsight kernels export tests bench setup.py
	$(VENV)/bin/ruff format --check fastinsight kernels export tests bench setup.py
	$(VENV)/bin/mypy fastinsight

bench-smoke: setup
	$(PY) bench/bench_kernels.py --smoke

clean:
	rm -rf $(VENV) build dist *.egg-info $(DEMO_DIR)
