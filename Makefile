# The two commands of the README:
#   make bench   runs the benchmark suite on this machine's default device
#   make test    runs the whole test suite (what CI runs)
# Both create .venv from the lock file requirements-dev.lock when it is missing
# or the lock changed, and (re)build fasttx into it with its extension compiled
# ahead of time. Others:
#   make lock        resolves requirements-dev.in anew, runs `make test` on it, and
#                    rewrites requirements-dev.lock only if that passes
#   make test-floor  builds fasttx on the lowest torch it supports and runs the CPU tests

PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export CUDA_HOME ?= /usr/local/cuda
export TRITON_DEFAULT_FP_FUSION ?= 1
LOCK := requirements-dev.lock

.PHONY: test bench build clean lock test-floor gpu-check

# --no-deps: the lock holds every package, so nothing unpinned can slip in; pip check proves it complete.
$(VENV)/.deps-stamp: $(LOCK)
	$(PYTHON) -m venv --clear $(VENV)
	$(PY) -m pip install -q --no-deps -r $(LOCK)
	$(PY) -m pip check
	touch $@

# Without a GPU (CI) the installed extension links its CUDA kernels for sm_80 alone: nvcc is the
# longest step of a fresh clone's make test, and tests/test_cuda_build.py compiles every .cu for
# sm_80 and sm_90 anyway (0 spills on both). With a GPU, or TORCH_CUDA_ARCH_LIST set, setup.py's
# choice stands (sm_80 and sm_90).
NO_GPU := $(shell nvidia-smi -L >/dev/null 2>&1 || echo 1)
BUILD_ARCHS := $(if $(and $(NO_GPU),$(if $(TORCH_CUDA_ARCH_LIST),,1)),TORCH_CUDA_ARCH_LIST=8.0,)

build: $(VENV)/.deps-stamp
	FASTTX_BUILD_EXTENSION=1 $(BUILD_ARCHS) $(PY) -m pip install --no-build-isolation --no-deps -e .

# The compile-only rungs -- every Triton config through ptxas (tests/test_triton_aot*.py) and every
# .cu file through nvcc (tests/test_cuda_build.py), ~15 minutes of mostly one thread each -- run in
# one pytest beside the rest of the suite, so that together they fit CI's 25 minutes on 2 cores.
# Their report is printed after the others'; the target fails if any of the three fails.
COMPILE_LOG := build/test_compile_rungs.log
COMPILE_RUNGS := $(wildcard tests/test_triton_aot*.py) tests/test_cuda_build.py

test: build
	@mkdir -p build
	@$(PY) -m pytest $(COMPILE_RUNGS) -ra --durations=5 > $(COMPILE_LOG) 2>&1 & rungs=$$!; \
	$(PY) -m pytest tests -ra --durations=10 $(addprefix --ignore=,$(COMPILE_RUNGS)); main=$$?; \
	TRITON_INTERPRET=1 $(PY) -m pytest tests/interpreter -ra --durations=5; interp=$$?; \
	echo "== waiting for the compile-only rungs ($(COMPILE_RUNGS), log: $(COMPILE_LOG)) =="; \
	wait $$rungs; rungs_rc=$$?; cat $(COMPILE_LOG); \
	echo "== pytest exit codes: suite $$main, interpreter $$interp, compile rungs $$rungs_rc =="; \
	test $$main -eq 0 -a $$interp -eq 0 -a $$rungs_rc -eq 0

# The kernel suite, then the reference GPT trained eager and fused side by side, in its short form.
bench: build
	$(PY) -m bench
	$(PY) -m fasttx compare --quick

# On a machine with a CUDA GPU and its own PyTorch (no venv, no network): build for that GPU, run the
# GPU tests and a short benchmark, write everything to GPU_CHECK_OUT. Without a GPU it is a dry run
# of the same steps (tests/test_gpu_check.py runs that in make test). See bench/gpu_check.py.
GPU_CHECK_OUT ?= build/gpu-check
GPU_PYTHON ?= $(if $(wildcard $(PY)),$(PY),python3)
gpu-check:
	$(GPU_PYTHON) -m bench.gpu_check --out $(GPU_CHECK_OUT)

LOCK_VENV := build/lock-venv
lock:
	$(PYTHON) -m venv --clear $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q -U pip setuptools wheel
	$(LOCK_VENV)/bin/pip install -q -r requirements-dev.in
	@mkdir -p build
	{ sed -n '1,2p' $(LOCK) | sed "s/^# Resolved and tested .*/# Resolved and tested $$(date +%F) on Python $$($(LOCK_VENV)/bin/python -c 'import platform; print(platform.python_version())'), Linux x86-64./"; \
	  $(LOCK_VENV)/bin/pip freeze --all --exclude-editable | grep -v -i '^fasttx'; } > build/candidate.lock
	touch $(LOCK_VENV)/.deps-stamp
	$(MAKE) test VENV=$(LOCK_VENV)
	cp build/candidate.lock $(LOCK)
	@echo "== $(LOCK) rewritten; the next make test rebuilds .venv from it =="

# The floor of pyproject.toml's torch>=2.9, in its own venv and its own copy of the sources, so that its
# in-place build of fasttx._C never touches .venv's. CPU only: that torch is a CUDA 12 build and nvcc here is 13.
# Below 2.9: at::vec::fnmadd and the cuBLASLt workspace size are missing, and on 2.6 torch.compile,
# rms_norm's default eps under autocast and the recompute memory tests fail.
# The tests' own needs come unpinned; without transformers the Hugging Face tests skip.
FLOOR_TORCH := 2.9.1
FLOOR := build/floor
test-floor:
	$(PYTHON) -m venv --clear $(FLOOR)/venv
	$(FLOOR)/venv/bin/pip install -q -U pip setuptools wheel
	$(FLOOR)/venv/bin/pip install -q torch==$(FLOOR_TORCH) numpy ninja pytest packaging tqdm matplotlib safetensors expecttest
	rm -rf $(FLOOR)/src && mkdir -p $(FLOOR)/src
	git ls-files -z --cached --others --exclude-standard | xargs -0 cp -d --parents -t $(FLOOR)/src
	cd $(FLOOR)/src && FASTTX_BUILD_EXTENSION=1 FASTTX_BUILD_CUDA=0 ../venv/bin/pip install --no-build-isolation --no-deps -e .
	cd $(FLOOR)/src && ../venv/bin/python -m pytest tests -ra -q -p no:cacheprovider --ignore=tests/test_triton_aot.py \
		--ignore=tests/test_triton_aot_cross_entropy.py --ignore=tests/test_cuda_build.py \
		--ignore=tests/test_triton_aot_apply_rotary.py

clean:
	rm -rf build fasttx/_C*.so *.egg-info
