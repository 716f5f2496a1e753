#!/usr/bin/env bash
# Read the one list of Debian packages (debian-packages.txt) for make and .ci/run.
#   tools/debian-packages.sh                 every package, one per line
#   tools/debian-packages.sh --missing       those not installed
#   tools/debian-packages.sh --build-missing build packages (marked `build:`) not installed
set -euo pipefail
list="$(dirname "$0")/../debian-packages.txt"
case "${1:-}" in
--build-missing) pkgs=$(grep -E '#.*build:' "$list" | sed -e 's/#.*//') ;;
*) pkgs=$(sed -e 's/#.*//' "$list") ;;
esac
for p in $pkgs; do
	if [ -n "${1:-}" ]; then
		dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || echo "$p"
	else
		echo "$p"
	fi
done | tr '\n' ' ' | sed -e 's/ $//'
echo
