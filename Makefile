# tokend — the two set-up commands are `make run` and `make test` (see README.md).
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: run test lint format bench fuzz soak deps venv clean

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

# Every parser's fuzz target, coverage-guided (atheris; hypothesis if atheris is missing):
# FUZZ_INPUTS per target (default 1000000), FUZZ_TARGETS=a,b to pick. docs/reliability.md.
FUZZ_INPUTS ?= 1000000
fuzz: venv
	$(PY) tools/fuzz.py --inputs $(FUZZ_INPUTS)

# 64 clients (8 of them PKCS#11 programs through p11-kit-client.so: SOAK_P11KIT_CLIENTS),
# tokens unplugged and replugged, over the in-process, USB and PC/SC transports; stops by
# itself after SOAK_SECONDS (default 300). docs/reliability.md.
SOAK_SECONDS ?= 300
soak: deps venv
	$(PY) -m bench.soak --seconds $(SOAK_SECONDS) --json soak-results.json

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
