# The two commands of the README:
#   make bench   runs the benchmark suite on this machine's default device
#   make test    runs the whole test suite (what CI runs)
# Both create .venv with the pinned development environment when it is
# missing and (re)build fasttx into it.

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export CUDA_HOME ?= /usr/local/cuda
export TRITON_DEFAULT_FP_FUSION ?= 1
# Pinned dev environment. torch 2.14.1 is the CUDA 13.0 build: it runs on a
# CPU and lets the CUDA extension compile and link without a GPU.
DEV_REQUIREMENTS := torch==2.14.1 ninja numpy pybind11 pytest matplotlib tqdm

.PHONY: test bench build clean

$(VENV)/.deps-stamp:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -U pip setuptools wheel
	$(PY) -m pip install $(DEV_REQUIREMENTS)
	touch $@

build: $(VENV)/.deps-stamp
	$(PY) -m pip install --no-build-isolation --no-deps -e .

test: build
	$(PY) -m pytest tests -ra
	TRITON_INTERPRET=1 $(PY) -m pytest tests/interpreter -ra

bench: build
	$(PY) -m bench

clean:
	rm -rf build fasttx/_C*.so *.egg-info
