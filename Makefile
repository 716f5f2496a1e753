# tokend — the two set-up commands are `make run` and `make test` (see README.md).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test lint format bench deps venv clean

# Debian packages: the services the tests run and the headers that building pyscard needs.
# The one list is debian-packages.txt (.ci/run installs from it too). Root only; skipped
# when every package is present.
deps:
	@missing=$$(tools/debian-packages.sh --missing); \
	if [ -n "$$missing" ]; then \
		if [ "$$(id -u)" != 0 ]; then \
			echo "tokend setup: step 'Debian packages' needs root: run 'sudo make deps', or 'apt-get install -y $$missing'" >&2; exit 1; fi; \
		echo "installing: $$missing"; \
		if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing; }; then \
			echo "tokend setup: step 'Debian packages' failed: apt-get could not install $$missing (see above)" >&2; exit 1; fi; \
	fi

$(VENV)/.installed: pyproject.toml
	@tools/venv.sh $(VENV)

venv: $(VENV)/.installed

# The daemon with every kind of virtual token side by side (a PIV card behind real pcscd +
# vpcd, a USB CCID token, …); the banner says what to try and how to pull each one.
run: deps venv
	$(PY) -m tokend.cli.tokend_main simulate --all --banner

test: deps venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest -q

lint: venv
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

format: venv
	$(VENV)/bin/ruff check --fix . && $(VENV)/bin/ruff format .

bench: deps venv
	$(PY) -m bench

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
