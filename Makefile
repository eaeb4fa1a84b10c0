# The tasks CI runs (.ci/run runs `make ci`); each target is one step a contributor can run alone.
.PHONY: setup lint typecheck image test test-fast guest guest-build ci seccomp lock docs bench-cluster
VENV := .venv/bin

setup:          ## packages, uv, .venv, and the test suites' extras (Chromium)
	deploy/setup.sh --test

lint:           ## ruff (lint and format) and the import contracts (lint-imports, pyproject's [tool.importlinter])
	$(VENV)/ruff check .
	$(VENV)/ruff format --check .
	$(VENV)/lint-imports

typecheck:      ## mypy --strict over src, tests and pool (the guest code)
	$(VENV)/mypy

image:          ## the runner image (debootstrap base, offline wheels); skips when built
	$(VENV)/warmpod image build

test:           ## the README's test command: every host suite, coverage of the in-process code
	$(VENV)/pytest --cov=warmpod --cov-report=term:skip-covered

test-fast:      ## unit and API suites: no Podman, seconds
	$(VENV)/pytest tests/unit tests/api

guest-build:    ## the cgroup v2 guests (cgv2vm's build.sh: UML 6.12, or 7.2 where AMX needs it)
	tests/cgv2/run.sh --build-only

guest:          ## the integration and security suites rootless on cgroup v2, in the guest
	tests/cgv2/run.sh

ci: setup lint typecheck image test guest-build guest

seccomp:        ## regenerate pool/seccomp.json from Podman's default profile and pool/seccomp.py's table
	$(VENV)/python pool/seccomp.py

docs:           ## regenerate docs/configuration.md's settings tables from src/warmpod/settings.py
	$(VENV)/python deploy/settings_doc.py

bench-cluster:  ## SQLite vs PostgreSQL latency, one vs two nodes' throughput, writes per run (QUICK=1: small)
	$(VENV)/python bench/cluster.py $(if $(QUICK),--quick)

lock:           ## regenerate uv.lock and the runner image's pool/requirements.lock
	uv lock
	$(VENV)/warmpod image lock
