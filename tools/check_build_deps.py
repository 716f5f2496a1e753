"""CI guard: every Python dependency that has no wheel for this platform must have its build
packages in debian-packages.txt (marked `# build: DIST`), or a fresh machine cannot install
tokend. Asks the configured package index with `pip download --only-binary=:all:`.

Exit 0 when the list is complete; 1 with one line per missing entry otherwise.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NAME = re.compile(r"^\s*([A-Za-z0-9][A-Za-z0-9._-]*)")


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def python_dependencies(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """Distribution name (canonical) → requirement string, over dependencies and extras."""
    project = tomllib.loads(pyproject.read_text())["project"]
    requirements = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        requirements.extend(extra)
    found: dict[str, str] = {}
    for requirement in requirements:
        match = NAME.match(requirement)
        if match:
            found.setdefault(canonical(match.group(1)), requirement)
    return found


def build_packages(listing: Path = ROOT / "debian-packages.txt") -> dict[str, list[str]]:
    """Distribution name (canonical) → the Debian packages marked `# build: DIST`."""
    marked: dict[str, list[str]] = {}
    for line in listing.read_text().splitlines():
        package, _, comment = line.partition("#")
        match = re.search(r"build:\s*([A-Za-z0-9._-]+)", comment)
        if package.strip() and match:
            marked.setdefault(canonical(match.group(1)), []).append(package.strip())
    return marked


def has_wheel(requirement: str) -> bool:
    with tempfile.TemporaryDirectory() as scratch:
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-cache-dir"]
        result = subprocess.run(
            [*command, "--only-binary=:all:", "-d", scratch, requirement],
            capture_output=True,
            text=True,
            timeout=300,
        )
        return result.returncode == 0


def main() -> int:
    dependencies = python_dependencies()
    marked = build_packages()
    problems = [
        f"debian-packages.txt marks build packages for {dist!r}, which is no dependency"
        for dist in marked
        if dist not in dependencies
    ]
    for dist, requirement in sorted(dependencies.items()):
        if dist in marked:
            print(f"{dist}: built from source with {' '.join(marked[dist])}")
        elif has_wheel(requirement):
            print(f"{dist}: wheel")
        else:
            problems.append(
                f"{dist} has no wheel here: add the Debian packages its build needs to "
                f"debian-packages.txt, each marked '# build: {dist}'"
            )
    for problem in problems:
        print(f"check_build_deps: {problem}", file=sys.stderr)
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
