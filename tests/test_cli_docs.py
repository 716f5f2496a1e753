"""The man pages and bash completion are generated from the parsers (tools/gen_cli_docs.py)
and committed; they must match `--help` of today's commands."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import gen_cli_docs  # noqa: E402

sys.path.pop(0)


def test_generated_man_pages_and_completion_are_current() -> None:
    stale = [
        str(path.relative_to(ROOT))
        for path, text in gen_cli_docs.outputs().items()
        if not path.exists() or path.read_text() != text
    ]
    assert not stale, f"run `python tools/gen_cli_docs.py`: {stale} are out of date"


def test_bash_completion_completes_nested_commands() -> None:
    script = ROOT / "completion" / "tokenctl.bash"
    out = subprocess.run(
        [
            "bash",
            "-c",
            f"source {script}; COMP_WORDS=(tokenctl pin ''); COMP_CWORD=2; "
            '_tokenctl_complete; echo "${COMPREPLY[@]}"',
        ],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    assert {"change", "unblock"} <= set(out)


def test_version_everywhere() -> None:
    from tokend import __version__

    for module in ("tokend.cli.tokenctl", "tokend.cli.tokend_main"):
        out = subprocess.run(
            [sys.executable, "-m", module, "--version"], capture_output=True, text=True, check=True
        ).stdout
        assert __version__ in out
