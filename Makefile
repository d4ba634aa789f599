# The study in one command, the way research repos offer it. Run inside the virtual environment
# (. .venv/bin/activate), or pass PYTHON=.venv/bin/python.
#   make study                                   # adam vs gao: 30-trial sweeps, 5 seeds x 100 epochs
#   make study-quick                             # the same pipeline in seconds
#   make study OPTIMIZERS="adam gao gao_update" OVERRIDES="model=cnn"
#   make report                                  # the report only, from the sweeps already tracked
#   make replica                                 # the research note's own study, as it ran it
#   make audit                                   # that study under variations, claim by claim
#   make suite                                   # adam vs gao on five workloads, one verdict
#   make suite-quick                             # the same with one-epoch runs
PYTHON ?= python
# Empty: conf/report.yaml's optimizers.
OPTIMIZERS ?=
# Training-config overrides for every sweep and final run, e.g. model=cnn.
OVERRIDES ?=
PICK = $(if $(strip $(OPTIMIZERS)),--optimizers $(OPTIMIZERS))

.PHONY: study study-quick report replica audit suite suite-quick test test-slow lint

study:
	$(PYTHON) study.py $(PICK) -- $(OVERRIDES)

study-quick:
	$(PYTHON) study.py --quick $(PICK) -- $(OVERRIDES)

report:
	$(PYTHON) report.py $(PICK) -- $(OVERRIDES)

replica:
	$(PYTHON) study.py --preset seed_note

audit:
	$(PYTHON) study.py --preset seed_note_audit

suite:
	$(PYTHON) study.py --suite

suite-quick:
	$(PYTHON) study.py --suite --quick

lint:
	$(PYTHON) -m ruff check .

test: lint
	$(PYTHON) -m pytest

test-slow:
	$(PYTHON) -m pytest -m slow
