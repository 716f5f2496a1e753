#!/usr/bin/env bash
# Create the project venv and install tokend with its test extras. On failure, say in one
# line which step failed and what to do, then point at the full log (pip's traceback alone
# does not tell a new user that a Debian package is missing).
set -uo pipefail
venv=${1:-.venv}
py=${PYTHON:-python3}
log="$venv.log"

say() { printf 'tokend setup: %s\n' "$*" >&2; }

if ! "$py" -m venv "$venv" >"$log" 2>&1; then
	say "step 'create the venv' failed: $py cannot make a venv; run as root 'apt-get install -y python3-venv' (log: $log)"
	exit 1
fi
if ! "$venv/bin/python" -m pip install -q --upgrade pip >>"$log" 2>&1 ||
	! "$venv/bin/python" -m pip install -q -e '.[test]' >>"$log" 2>&1; then
	missing=$(tools/debian-packages.sh --build-missing)
	if grep -q -i -E "pyscard|winscard.h|libpcsclite" "$log" && [ -n "$missing" ]; then
		say "step 'install Python packages' failed: building pyscard needs $missing; run 'make deps' as root, or 'apt-get install -y $missing' (log: $log)"
	elif grep -q -i -E "could not find a version|no matching distribution|connection|timed out" "$log"; then
		say "step 'install Python packages' failed: a package index could not be reached or has no matching version (log: $log)"
	else
		say "step 'install Python packages' failed; the last lines of $log say why:"
		tail -n 5 "$log" >&2
	fi
	exit 1
fi
touch "$venv/.installed"
