# qbackend: developer entry points.  `make setup` is idempotent and quick on a
# second run; `make test` runs the test suite in the project venv.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

.PHONY: setup host-packages venv qemu qemu-ppc guest test bench run clean

setup: host-packages venv qemu qemu-ppc guest

host-packages:
	@scripts/install-host-packages.sh

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q -e '.[test]'
	@touch $@

qemu:
ifeq ($(QEMU),)
	@scripts/provision-qemu.sh build/qemu qemu-system-x86,qemu-utils,qemu-block-extra qemu-system-x86_64
else
	@echo "qemu: using QEMU=$(QEMU)"
endif

qemu-ppc:
	@scripts/provision-qemu.sh build/qemu-ppc qemu-system-ppc qemu-system-ppc64

guest:
	@scripts/build-guest.sh build/guest

test:
	$(VENV)/bin/python -m pytest

bench:
	$(VENV)/bin/python scripts/bench_vfio_user.py
	$(VENV)/bin/python scripts/bench_nbd.py
	$(VENV)/bin/python scripts/bench_ivshmem.py
	$(VENV)/bin/python scripts/bench_qed.py

run:
	$(VENV)/bin/qbackend run

clean:
	rm -rf build $(VENV) *.egg-info .pytest_cache .hypothesis
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
