VENV ?= .venv
BIN := $(VENV)/bin

SPEC ?= pipelines/demo.yaml

.PHONY: setup demo test compare ui
$(VENV)/.installed: pyproject.toml scripts/install.sh scripts/install_vllm.sh
	bash scripts/install.sh $(VENV)
	touch $@

setup: $(VENV)/.installed

demo: setup
	$(BIN)/alignflow run pipelines/demo.yaml

test: setup
	@bash scripts/install_chromium.sh
	$(BIN)/python -m pytest -q

# What the end of a run suggests, without activating the venv: `make compare SPEC=...`.
compare: setup
	$(BIN)/alignflow compare $(SPEC)

ui: setup
	$(BIN)/alignflow ui $(SPEC)
