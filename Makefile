# qbackend: developer entry points.  `make setup` is idempotent and quick on a
# second run; `make test` runs the test suite in the project venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed
QB := $(VENV)/bin/qbackend
# Provisioned QEMU and guest go to the checkout's build/ (qbackend.machine.data_dir).
DATA_DIR := $(CURDIR)/build

.PHONY: setup host-packages venv qemu qemu-ppc guest test test-fast check fuzz bench run clean

setup: host-packages venv qemu qemu-ppc guest

host-packages:
	@bash backend/provision/install-host-packages.sh

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	@touch $@

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

test:
	$(VENV)/bin/python -m pytest

# The tests that boot no guest (about a minute).
test-fast:
	$(VENV)/bin/python -m pytest -m "not guest"

# mypy reads the package as it installs: build/typecheck/qbackend is a tree
# of links (backend/*, protocol/ as qbackend/protocol, qemu-configs/ as
# qbackend/profiles), made anew on every run.
check: venv
	$(VENV)/bin/ruff check backend protocol qemu-configs tests scripts fuzz
	@rm -rf build/typecheck && mkdir -p build/typecheck/qbackend
	@for f in backend/*; do ln -s "$(CURDIR)/$$f" build/typecheck/qbackend/; done
	@ln -s "$(CURDIR)/protocol" build/typecheck/qbackend/protocol
	@ln -s "$(CURDIR)/qemu-configs" build/typecheck/qbackend/profiles
	cd build/typecheck && $(CURDIR)/$(VENV)/bin/mypy --config-file $(CURDIR)/pyproject.toml -p qbackend

# Coverage-guided fuzzing (atheris) of every parser of outside input, FUZZ_SECONDS per
# target, one target after the other; fails on any finding (crash, hang, runaway memory),
# which lands in build/fuzz/<target>/.  Executions and coverage per target are summarised.
FUZZ_SECONDS ?= 30
FUZZ_SEED ?= 0
fuzz: venv
	$(VENV)/bin/python -m fuzz.run --seconds $(FUZZ_SECONDS) --seed $(FUZZ_SEED)

bench:
	$(VENV)/bin/python scripts/bench_vfio_user.py
	$(VENV)/bin/python scripts/bench_nbd.py
	$(VENV)/bin/python scripts/bench_nbd_clients.py
	$(VENV)/bin/python scripts/bench_soak.py
	$(VENV)/bin/python scripts/bench_ivshmem.py
	$(VENV)/bin/python scripts/bench_qed.py
	$(VENV)/bin/python scripts/bench_vhost_user_blk.py
	$(VENV)/bin/python scripts/bench_mmio.py

run:
	$(QB) run

clean:
	rm -rf build $(VENV) *.egg-info .pytest_cache .hypothesis .mypy_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
