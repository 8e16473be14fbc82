# make reproduce : set-up, then the whole pipeline on the default data
# make test      : set-up, then the test suite
# make lint      : set-up, then ruff (pyproject.toml [tool.ruff]) and snakemake --lint
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.deepimage-setup
CORES ?= all
# make test's processes (pytest-xdist): the suite's jobs leave a core idle about a third of the time
TEST_WORKERS ?= 2

.PHONY: setup reproduce test lint results clean services services-stop tracking-server tracking-server-stop

setup: $(STAMP)

$(STAMP): pyproject.toml envs/requirements.txt envs/requirements-bench.txt envs/requirements-slurm.txt envs/build_horovod.sh
	@command -v $(PYTHON) >/dev/null || { echo "setup: $(PYTHON) not found (need Python 3.11)"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -r envs/requirements.txt -r envs/requirements-bench.txt -r envs/requirements-slurm.txt
	PYTHON=$(PY) bash envs/build_horovod.sh
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

reproduce: setup
	source $(VENV)/bin/activate && snakemake --cores $(CORES)

test: setup
	source $(VENV)/bin/activate && pytest -q -n $(TEST_WORKERS)

# The services some tests need (root, Debian): a two-node SLURM cluster and headless Chromium.
services:
	bash tests/cluster/install.sh
	bash envs/install_browser.sh
	bash tests/cluster/start.sh

services-stop:
	bash tests/cluster/stop.sh

# A team's MLflow tracking server on PostgreSQL (state in .tracking-server/; see the script's
# header for TRACKING_HOST, TRACKING_PORT, TRACKING_ARTIFACTS). Stop keeps the data.
tracking-server: setup
	bash envs/tracking_server.sh start

tracking-server-stop:
	bash envs/tracking_server.sh stop

lint: setup
	source $(VENV)/bin/activate && ruff check deepimage tests && snakemake --lint && python .ci/check_wording.py

# docs/results.md from the measurement records in docs/results/*.json
results: setup
	$(PY) -m deepimage.bench.results render

clean:
	rm -rf results logs .snakemake mlflow.db mlartifacts
