# The README's two commands, on a fresh clone with Python >= 3.11 and nothing else:
#   make study    make .venv if it is missing or older than the requirements, then the study:
#                 adam vs gao, each tuned by a 30-trial Optuna sweep, 5 seeds x 100 epochs, the report
#   make test     the same environment with the test tools (requirements-ci.txt), then ruff and
#                 the fast suite
# Once .venv is made, a target starts at once: it is remade only when requirements.txt,
# requirements-ci.txt or pyproject.toml change. Every target runs in .venv:
#   make study-quick                             # the study's pipeline in seconds: a smoke run, no verdict
#   make study OPTIMIZERS="adam gao gao_update" OVERRIDES="model=cnn"
#   make study OPTIMIZERS="lion gao" BASELINE=lion   # GAO against another optimizer (lion: conf/optimizer)
#   make report                                  # the report only, from the sweeps already tracked
#   make replica                                 # the research note's own study, as it ran it
#   make audit                                   # that study under variations, claim by claim
#   make suite                                   # adam vs gao on five workloads, one verdict
#   make suite-quick                             # the same with one-epoch runs: a smoke run
#   make ui                                      # MLflow's UI of mlruns/, printing the links to the runs
#   make test-slow                               # the slow suite (.ci/run starts its servers)
#   make test-hydra14                            # the fast suite on Hydra 1.4.0rc3, in .venv-hydra14
# torch is installed first, by pip, at requirements.txt's pin: the pin picks the version, not the
# build. Where pip's index offers CUDA builds (PyPI on Linux), ask for the CPU one with
#   make study TORCH_INDEX=https://download.pytorch.org/whl/cpu
# (this project's machines take a local CPU wheel without it).

# The Python that makes .venv.
PYTHON3 ?= python3
VENV ?= .venv
# The index torch comes from (empty: pip's own).
TORCH_INDEX ?=
# A file of uv --override pins applied over requirements.txt (test-hydra14's).
OVERRIDE ?=
# Empty: conf/report.yaml's optimizers and baseline.
OPTIMIZERS ?=
BASELINE ?=
# Training-config overrides for every sweep and final run, e.g. model=cnn.
OVERRIDES ?=

PY = $(VENV)/bin/python
# Recipes run as in the activated .venv: what they start by name (python, mlflow) is its own.
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(VIRTUAL_ENV)/bin:$(PATH)
TORCH = $(shell grep -m1 '^torch==' requirements.txt)
PICK = $(if $(strip $(OPTIMIZERS)),--optimizers $(OPTIMIZERS)) $(if $(BASELINE),--baseline $(BASELINE))

.PHONY: study study-quick report replica audit suite suite-quick ui test test-slow lint fast test-hydra14

$(VENV)/.study: requirements.txt pyproject.toml $(OVERRIDE)
	@$(PYTHON3) -c 'import sys; sys.version_info >= (3, 11) or sys.exit("make: gradalign needs Python >= 3.11; $(PYTHON3) is " + sys.version.split()[0] + ": pass PYTHON3=python3.11 (or newer)")'
	test -x $(PY) || $(PYTHON3) -m venv $(VENV)
	$(PY) -m pip install --quiet uv
	$(PY) -m pip install --quiet $(TORCH) $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(PY) -m uv pip install --quiet --python $(PY) --compile-bytecode -r requirements.txt \
		$(if $(OVERRIDE),--override $(OVERRIDE))
	touch $@

$(VENV)/.test: $(VENV)/.study requirements-ci.txt $(OVERRIDE)
	$(PY) -m uv pip install --quiet --python $(PY) --compile-bytecode -r requirements-ci.txt \
		$(if $(OVERRIDE),--override $(OVERRIDE))
	touch $@

study: $(VENV)/.study
	$(PY) study.py $(PICK) -- $(OVERRIDES)

study-quick: $(VENV)/.study
	$(PY) study.py --quick $(PICK) -- $(OVERRIDES)

report: $(VENV)/.study
	$(PY) report.py $(PICK) -- $(OVERRIDES)

replica: $(VENV)/.study
	$(PY) study.py --preset seed_note

audit: $(VENV)/.study
	$(PY) study.py --preset seed_note_audit

suite: $(VENV)/.study
	$(PY) study.py --suite

suite-quick: $(VENV)/.study
	$(PY) study.py --suite --quick

ui: $(VENV)/.study
	$(PY) -m gradalign.ui

lint: $(VENV)/.test
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

test: lint fast

fast: $(VENV)/.test
	$(PY) -m pytest

# The fast suite on Hydra 1.4 (requirements-hydra14.txt over the pinned set), in a venv of its own.
test-hydra14:
	$(MAKE) --no-print-directory fast VENV=.venv-hydra14 OVERRIDE=requirements-hydra14.txt

test-slow: $(VENV)/.test
	$(PY) -m pytest -m slow
