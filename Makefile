# Skiplock — `make help` lists what you can do.
SHELL := /bin/bash
PYTHON ?= python3
UV := .skiplock/uv/bin/uv
VENV := .venv
PY := $(VENV)/bin/python
export UV_PYTHON_DOWNLOADS := never
export UV_PROJECT_ENVIRONMENT := $(VENV)

.DEFAULT_GOAL := help
.PHONY: help run test lint typecheck pytest install browser db-start db-stop db-status psql bench clean

help:  ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-11s %s\n", $$1, $$2}'

run: install  ## start the whole service (embedded PostgreSQL, migrations, web, worker)
	@DEBUG=$${DEBUG:-true} $(PY) manage.py up

test: install browser  ## run ruff, mypy and the whole test suite against a real PostgreSQL
	@$(MAKE) --no-print-directory lint typecheck pytest

lint: install  ## ruff
	$(VENV)/bin/ruff check .

typecheck: install  ## mypy (with django-stubs)
	DEBUG=true $(VENV)/bin/mypy .

pytest: install  ## pytest alone (PYTEST_ARGS="-k name" to select)
	@status=0; DEBUG=true SKIPLOCK_PG_INSTANCE=test $(VENV)/bin/pytest $(PYTEST_ARGS) || status=$$?; \
	DEBUG=true SKIPLOCK_PG_INSTANCE=test $(PY) manage.py db --instance test stop >/dev/null 2>&1 || true; \
	if [ $$status -eq 5 ]; then echo "pytest ran no test: failing"; fi; exit $$status

install: $(VENV)/.synced  ## install Python and the locked dependencies (no-op when up to date)

$(UV):
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 12))' || { echo "Skiplock needs Python 3.12+ as $(PYTHON)"; exit 1; }
	@# A private uv: a venv of its own, or (Debian without python3-venv) pip --target.
	$(PYTHON) -m venv .skiplock/uv && .skiplock/uv/bin/pip install --quiet --disable-pip-version-check 'uv>=0.9,<1' \
	  || { rm -rf .skiplock/uv; $(PYTHON) -m pip install --quiet --disable-pip-version-check --target .skiplock/uv 'uv>=0.9,<1'; }

$(VENV)/.synced: $(UV) pyproject.toml uv.lock
	$(UV) sync --frozen --quiet
	@touch $@

browser:  ## install Debian's chromium for the browser tests (root + apt only)
	@command -v chromium >/dev/null || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing Debian's chromium for the browser tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; \
	  else echo "chromium is missing: browser tests will be skipped"; fi; }

db-start: install  ## start the embedded PostgreSQL
	@DEBUG=true $(PY) manage.py db start
db-stop: install  ## stop the embedded PostgreSQL
	@DEBUG=true $(PY) manage.py db stop
db-status: install  ## is the embedded PostgreSQL running?
	@DEBUG=true $(PY) manage.py db status
psql: install  ## open psql on the embedded PostgreSQL
	@DEBUG=true $(PY) manage.py db psql
bench: install  ## run the benchmarks (~25 min on 2 cores) and regenerate docs/benchmarks.md
	$(PY) -m bench --size full

clean:  ## remove the virtualenv and every embedded database of this checkout (stops them first)
	-@for home in .skiplock/*/; do name=$$(basename "$$home"); [ -f "$$home/data/PG_VERSION" ] && \
	  DEBUG=true SKIPLOCK_PG_INSTANCE="$$name" $(PY) manage.py db --instance "$$name" stop 2>/dev/null; done; true
	@# As root the clusters live in /var/tmp/skiplock/<checkout>/ (linked from .skiplock/): remove them too.
	-@for link in .skiplock/*; do [ -L "$$link" ] && rm -rf "$$(readlink -f "$$link")"; done; true
	rm -rf $(VENV) .skiplock staticfiles
