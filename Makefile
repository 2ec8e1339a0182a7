# Two commands do all the setup on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
WORK   ?= medxfer-work

.PHONY: install demo test bench lint clean services

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "Python 3.11 is required (set PYTHON=...)"; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e ".[dev,server]"
	@touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/medxfer demo --out demo-data
	$(BIN)/medxfer run data_specs/breastmnist_demo.yaml --workspace $(WORK)

test: $(STAMP)
	$(BIN)/python -m pytest -q

# Longer fuzzing than make test's 60 s (MEDXFER_FUZZ_SECONDS, split over the targets); a crash is saved into
# tests/fuzz/regressions/<target>/, which every test run replays.
.PHONY: fuzz
fuzz: $(STAMP)
	MEDXFER_FUZZ_SECONDS=$${MEDXFER_FUZZ_SECONDS:-600} MEDXFER_FUZZ_SAVE=1 $(BIN)/python -m pytest -q -s tests/fuzz

# PostgreSQL for the team-server tests (tests/tracking: a throw-away cluster per test module), when it is missing.
services:
	@ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || { \
	  SUDO=""; [ "$$(id -u)" = 0 ] || SUDO=sudo; \
	  $$SUDO apt-get update && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y --no-install-recommends postgresql; }

bench: $(STAMP)
	$(BIN)/python -m benchmarks.run_all

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(WORK) demo-data .pytest_cache
