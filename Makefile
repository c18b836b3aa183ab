# qbackend: developer entry points.  `make setup` is idempotent and quick on a
# second run; `make test` runs the test suite in the project venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
QB := $(VENV)/bin/qbackend
# Provisioned QEMU and guest go to the checkout's build/ (qbackend.machine.data_dir).
DATA_DIR := $(CURDIR)/build

.PHONY: setup host-packages venv native qemu qemu-ppc guest ppc-guest spapr-differential test test-dev test-fast check fuzz bench run clean

setup: host-packages venv qemu qemu-ppc guest

host-packages:
	@bash backend/qbackend/provision/install-host-packages.sh

venv: $(STAMP)

$(STAMP): pyproject.toml hatch_build.py
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	@touch $@

# The C helpers of the editable checkout, rebuilt in place when a .c or .h
# is newer than its library (installed copies carry them from the wheel).
native: venv
	@$(VENV)/bin/python backend/qbackend/plumbing/native_build.py

qemu: venv
ifeq ($(QEMU),)
	@$(QB) --data-dir $(DATA_DIR) setup --no-host-packages --only qemu
else
	@echo "qemu: using QEMU=$(QEMU)"
endif

qemu-ppc: venv
	@$(QB) --data-dir $(DATA_DIR) setup --no-host-packages --only qemu-ppc

guest: venv
	@$(QB) --data-dir $(DATA_DIR) setup --no-host-packages --only guest

ppc-guest: venv
	@$(QB) --data-dir $(DATA_DIR) setup --no-host-packages --only ppc-guest

# The DRC model against QEMU 11.1's pseries with a booted ppc64le guest (about a
# minute): hot-plug of DIMMs, cores and PCI functions, every RTAS call, tree and
# event log compared item by item (scripts/spapr_differential.py).
spapr-differential: qemu-ppc ppc-guest
	QBACKEND_DATA_DIR=$(DATA_DIR) $(VENV)/bin/python scripts/spapr_differential.py

# The suite as CI runs it: against a wheel built from this tree, installed (not
# editable) into a virtual environment of its own, with the C helpers required.
INSTALLED := build/installed
test: venv
	@rm -rf build/dist
	$(VENV)/bin/python -m pip wheel -q --no-deps -w build/dist .
	@test -x $(INSTALLED)/bin/python || $(PYTHON) -m venv $(INSTALLED)
	$(INSTALLED)/bin/python -m pip install -q "$$(ls build/dist/qbackend-*.whl)[test]"
	$(INSTALLED)/bin/python -m pip install -q --force-reinstall --no-deps build/dist/qbackend-*.whl
	QBACKEND_NATIVE=require $(INSTALLED)/bin/python -m pytest $(PYTEST_ARGS)

# The developer's loop: the suite on the editable checkout.
test-dev: native
	QBACKEND_NATIVE=require $(VENV)/bin/python -m pytest $(PYTEST_ARGS)

# The tests that boot no guest (about a minute), on the editable checkout.
test-fast: native
	QBACKEND_NATIVE=require $(VENV)/bin/python -m pytest -m "not guest" $(PYTEST_ARGS)

# ruff and mypy on the tree as it is: its folders are the import paths
# (mypy_path in pyproject.toml names the three source roots).
check: venv
	$(VENV)/bin/ruff check backend protocol qemu-configs tests scripts fuzz hatch_build.py
	$(VENV)/bin/mypy -p qbackend

# Coverage-guided fuzzing (atheris) of every parser of outside input, FUZZ_SECONDS per
# target, one target after the other; fails on any finding (crash, hang, runaway memory),
# which lands in build/fuzz/<target>/.  Executions and coverage per target are summarised.
FUZZ_SECONDS ?= 30
FUZZ_SEED ?= 0
fuzz: native
	$(VENV)/bin/python -m fuzz.run --seconds $(FUZZ_SECONDS) --seed $(FUZZ_SEED)

bench: native
	$(VENV)/bin/python scripts/bench_vfio_user.py
	$(VENV)/bin/python scripts/bench_nbd.py
	$(VENV)/bin/python scripts/bench_nbd_clients.py
	$(VENV)/bin/python scripts/bench_soak.py
	$(VENV)/bin/python scripts/bench_ivshmem.py
	$(VENV)/bin/python scripts/bench_qed.py
	$(VENV)/bin/python scripts/bench_cli.py
	$(VENV)/bin/python scripts/bench_vhost_user_blk.py
	$(VENV)/bin/python scripts/bench_restart.py
	$(VENV)/bin/python scripts/bench_mmio.py

run:
	$(QB) run

clean:
	rm -rf build $(VENV) *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
