# make test  — set up (if needed) and run the whole test suite
# make bench — set up (if needed) and run the benchmark on whatever device is present (rows in
#              .bench/results.csv, plots and tables in .bench/report/: both gitignored)
# make check-cuda — compile every csrc/*.cu with nvcc for sm_75, sm_80 and sm_90 (compile only, warnings
#                   are errors; no GPU needed). The test suite runs the same check when nvcc exists.
# make test-compat — the GPU machine's stack on this machine (not part of CI: a 4 GB download):
#                   a second venv, .venv-compat, with torch 2.11.0, triton 3.6.0, the current numpy
#                   and no pytorch-metric-learning; runs test collection, the CUDA sources against
#                   that torch's headers, the compile check with that Triton's ptxas, the triton and
#                   cpu contract tests under the interpreter, and the compile tests. Triton 3.6's
#                   interpreter cannot run with numpy >= 2.4 (triton #9171; the triton backend
#                   refuses it, saying so): the interpreter's tests take numpy<2.4 from an overlay
#                   (.venv-compat/numpy-before-2.4 on PYTHONPATH), as a CPU user of that Triton must.
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

.PHONY: setup test bench check-cuda compat-setup test-compat

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

COMPAT_VENV ?= .venv-compat
COMPAT_PYTHON := $(COMPAT_VENV)/bin/python
COMPAT_NUMPY := $(COMPAT_VENV)/numpy-before-2.4
COMPAT_STACK := torch==2.11.0 triton==3.6.0 numpy pytest pytest-timeout hypothesis ninja tqdm matplotlib "setuptools>=70" wheel

compat-setup:
	@[ -x $(COMPAT_PYTHON) ] || $(BOOT_PYTHON) -m venv $(COMPAT_VENV)
	@$(COMPAT_PYTHON) -c "import torch, triton; assert torch.__version__.split('+')[0] == '2.11.0' and triton.__version__ == '3.6.0'" 2>/dev/null \
		|| $(COMPAT_PYTHON) -m pip install -q $(COMPAT_STACK)
	@[ -d $(COMPAT_NUMPY) ] || $(COMPAT_PYTHON) -m pip install -q --no-deps --target $(COMPAT_NUMPY) "numpy<2.4"
	@$(COMPAT_PYTHON) -m pip install -q --no-deps --no-build-isolation -e .

test-compat: compat-setup
	$(COMPAT_PYTHON) -c "import torch, triton, numpy; print('torch', torch.__version__, 'triton', triton.__version__, 'numpy', numpy.__version__)"
	@$(COMPAT_PYTHON) -m pytest --collect-only -q > $(COMPAT_VENV)/collection.txt \
		|| { tail -20 $(COMPAT_VENV)/collection.txt; exit 1; }
	@echo "collection: $$(tail -1 $(COMPAT_VENV)/collection.txt)"
	$(COMPAT_PYTHON) tools/check_cuda.py
	env -u TRITON_INTERPRET $(COMPAT_PYTHON) -m marginfused.kernels.compile_check
	PYTHONPATH=$(COMPAT_NUMPY) $(COMPAT_PYTHON) -m pytest -q -rs tests/test_contract.py -k "triton or cpu"
	PYTHONPATH=$(COMPAT_NUMPY) $(COMPAT_PYTHON) -m pytest -q -rs tests/test_compile.py
