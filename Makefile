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
DEV_REQUIREMENTS := torch==2.14.1 ninja numpy pybind11 pytest matplotlib tqdm transformers

.PHONY: test bench build clean

$(VENV)/.deps-stamp:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -U pip setuptools wheel
	$(PY) -m pip install $(DEV_REQUIREMENTS)
	touch $@

build: $(VENV)/.deps-stamp
	$(PY) -m pip install --no-build-isolation --no-deps -e .

# The AOT rung (ptxas on every Triton config, ~10 minutes cold) runs beside the rest of the suite:
# each is mostly one thread, and together they fit CI's 25 minutes on 2 cores. Its report is printed
# after the others'; the target fails if any of the three fails.
AOT_LOG := build/test_triton_aot.log

test: build
	@mkdir -p build
	@$(PY) -m pytest tests/test_triton_aot.py -ra --durations=5 > $(AOT_LOG) 2>&1 & aot=$$!; \
	$(PY) -m pytest tests -ra --durations=10 --ignore=tests/test_triton_aot.py; main=$$?; \
	TRITON_INTERPRET=1 $(PY) -m pytest tests/interpreter -ra --durations=5; interp=$$?; \
	echo "== waiting for the AOT rung (tests/test_triton_aot.py, log: $(AOT_LOG)) =="; \
	wait $$aot; aot_rc=$$?; cat $(AOT_LOG); \
	echo "== pytest exit codes: suite $$main, interpreter $$interp, AOT $$aot_rc =="; \
	test $$main -eq 0 -a $$interp -eq 0 -a $$aot_rc -eq 0

# The kernel suite, then the reference GPT trained eager and fused side by side, in its short form.
bench: build
	$(PY) -m bench
	$(PY) -m fasttx compare --quick

clean:
	rm -rf build fasttx/_C*.so *.egg-info
