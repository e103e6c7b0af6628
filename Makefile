# make test  — set up (if needed) and run the whole test suite
# make bench — set up (if needed) and run the benchmark on whatever device is present (rows in
#              .bench/results.csv, plots and tables in .bench/report/: both gitignored)
# make check-cuda — compile every csrc/*.cu with nvcc for sm_80 and sm_90 (compile only, warnings
#                   are errors; no GPU needed). The test suite runs the same check when nvcc exists.
#
# Setup: uses the active virtualenv, else creates .venv (seeing system packages, so a machine with
# torch preinstalled keeps its build); installs torch only if it is missing (torch==2.13.0, the CPU
# build on a machine without a GPU), then this package with its test and bench extras.

BOOT_PYTHON ?= python3
VENV ?= .venv
ifdef VIRTUAL_ENV
PYTHON := $(VIRTUAL_ENV)/bin/python
else
PYTHON := $(VENV)/bin/python
endif

.PHONY: setup test bench check-cuda

setup:
	@[ -n "$$VIRTUAL_ENV" ] || [ -x $(VENV)/bin/python ] || $(BOOT_PYTHON) -m venv --system-site-packages $(VENV)
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PYTHON) -m pip install torch==2.13.0
	@$(PYTHON) -c "import setuptools, sys; sys.exit(int(setuptools.__version__.split('.')[0]) < 70)" 2>/dev/null \
		|| $(PYTHON) -m pip install -q "setuptools>=70"
	@$(PYTHON) -m pip install -q --no-build-isolation -e ".[test,bench]"

test: setup
	$(PYTHON) -m pytest

bench: setup
	$(PYTHON) -m bench
	$(PYTHON) -m bench.report

check-cuda: setup
	$(PYTHON) tools/check_cuda.py
