# `make run` and `make test` work on a fresh machine: they create .venv and install exactly the tested
# dependency set from requirements.lock (pip-tools, with hashes) before doing anything else.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# torch is the one package outside the lock: its build depends on the machine (CPU here, CUDA on a GPU
# box), so it is installed first, by itself, and the lock is installed with --no-deps around it.
# requirements-torch.txt holds the tested version; on a GPU machine choose the CUDA build, e.g.
#   make TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" test
TORCH_SPEC ?= $(shell grep '^torch' requirements-torch.txt)
PIP_INSTALL := $(PY) -m pip install --quiet --disable-pip-version-check

.PHONY: install run test test-fast test-oldest lock clean-outputs

install: $(VENV)/.installed

# --no-deps + --require-hashes: pip resolves nothing, installs the lock's exact files and checks each
# hash; `pip check` then proves the set is consistent (with torch) before anything runs.
$(VENV)/.installed: requirements.lock requirements-torch.txt pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP_INSTALL) $(TORCH_SPEC)
	$(PIP_INSTALL) --no-deps --require-hashes -r requirements.lock
	$(PIP_INSTALL) --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $@

run: install
	$(PY) run.py

test: install
	$(PY) -m pytest

test-fast: install
	$(PY) -m pytest -m "not slow"

# Refresh the lock after changing a dependency in pyproject.toml (README: "Adding a dependency").
# pip-tools runs from its own throwaway venv so it never enters the project's environment.
lock:
	$(PYTHON) -m venv .venv-lock
	.venv-lock/bin/python -m pip install --quiet --disable-pip-version-check 'pip-tools>=7.4,<8'
	echo "$(TORCH_SPEC)" | cut -d' ' -f1 > .venv-lock/torch-constraint.txt
	.venv-lock/bin/pip-compile --quiet --generate-hashes --extra dev --strip-extras --unsafe-package torch \
	    --no-emit-index-url --no-emit-find-links --no-emit-trusted-host \
	    --constraint .venv-lock/torch-constraint.txt --output-file requirements.lock pyproject.toml
	sed -i 's#--constraint=[^ ]*torch-constraint.txt#--constraint=<TORCH_SPEC>#' requirements.lock

# The lowest versions pyproject.toml allows (its `>=` bounds, pinned with ==), in .venv-oldest, and the
# fast suite against them: the bounds are claims, this checks them. torch's lowest (2.11) is a CUDA
# build on PyPI (~3 GB of downloads); it runs on the CPU all the same.
test-oldest:
	$(PYTHON) -m venv .venv-oldest
	$(PYTHON) scripts/lowest_versions.py pyproject.toml --extra dev > .venv-oldest/lowest.txt
	.venv-oldest/bin/python -m pip install --quiet --disable-pip-version-check -r .venv-oldest/lowest.txt
	.venv-oldest/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -e .
	.venv-oldest/bin/python -m pip check
	KBENCH_ALLOW_DRIFT=1 .venv-oldest/bin/python -m pytest -m "not slow" -p no:cacheprovider

clean-outputs:
	rm -rf outputs
