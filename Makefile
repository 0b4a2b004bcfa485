VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: setup demo test
$(VENV)/.installed: pyproject.toml scripts/install.sh scripts/install_vllm.sh
	bash scripts/install.sh $(VENV)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/alignflow run pipelines/demo.yaml

test: setup
	$(BIN)/python -m pytest -q
