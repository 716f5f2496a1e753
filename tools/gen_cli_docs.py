"""Generate the man pages (man/tokend.1, man/tokenctl.1) and the bash completion
(completion/tokenctl.bash, completion/tokend.bash) from the argparse parsers themselves,
so they cannot drift from `--help`. `tests/test_cli_docs.py` fails when the committed
files are out of date; rerun `python tools/gen_cli_docs.py` after changing a command.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from tokend import __version__  # noqa: E402
from tokend.cli.tokenctl import build_parser as tokenctl_parser  # noqa: E402
from tokend.cli.tokend_main import build_parser as tokend_parser  # noqa: E402

PROGRAMS = {"tokend": tokend_parser, "tokenctl": tokenctl_parser}
SUMMARY = {
    "tokend": "the daemon putting hardware keys for mail behind one PKCS#11-style API",
    "tokenctl": "list, use and provision the tokens that tokend serves",
}


def _subparsers(
    parser: argparse.ArgumentParser,
) -> Iterator[tuple[str, str, argparse.ArgumentParser]]:
    """(name, help, parser) of each direct subcommand, in declaration order."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: a.help or "" for a in action._choices_actions}
            seen: set[int] = set()
            for name, sub in action.choices.items():
                if id(sub) in seen:
                    continue  # an alias
                seen.add(id(sub))
                yield name, helps.get(name, ""), sub


def _options(parser: argparse.ArgumentParser) -> list[argparse.Action]:
    return [
        a
        for a in parser._actions
        if a.option_strings and not isinstance(a, argparse._HelpAction | argparse._VersionAction)
    ]


def _walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], str, argparse.ArgumentParser]]:
    for name, text, sub in _subparsers(parser):
        yield (*path, name), text, sub
        yield from _walk(sub, (*path, name))


# --- man pages ---------------------------------------------------------------------------


def _roff(text: str) -> str:
    text = text.replace("\\", "\\\\").replace("-", "\\-")
    return "\n".join(
        ("\\&" + line) if line.startswith((".", "'")) else line for line in text.splitlines()
    )


def _option_line(action: argparse.Action) -> str:
    flags = ", ".join(f"\\fB{_roff(flag)}\\fR" for flag in action.option_strings)
    if action.nargs != 0:
        metavar = action.metavar or action.dest.upper()
        flags += f" \\fI{_roff(str(metavar))}\\fR"
    return flags


def _help_text(action: argparse.Action) -> str:
    text = action.help or ""
    if "%(default)" in text:
        text = text % {"default": action.default}
    return text


def man_page(program: str) -> str:
    parser = PROGRAMS[program]()
    lines = [
        f'.TH {program.upper()} 1 "" "tokend {__version__}" "tokend manual"',
        ".SH NAME",
        f"{program} \\- {_roff(SUMMARY[program])}",
        ".SH SYNOPSIS",
        f"\\fB{program}\\fR [\\fIOPTIONS\\fR] \\fICOMMAND\\fR [\\fIARGS\\fR]",
        ".SH DESCRIPTION",
        _roff(parser.description or ""),
        ".SH OPTIONS",
    ]
    for action in _options(parser):
        lines += [".TP", _option_line(action), _roff(_help_text(action))]
    lines += [".TP", "\\fB\\-\\-version\\fR", "print the version and exit"]
    lines.append(".SH COMMANDS")
    for path, text, sub in _walk(parser):
        positionals = " ".join(
            f"\\fI{_roff(a.metavar or a.dest).upper()}\\fR"
            for a in sub._actions
            if not a.option_strings and not isinstance(a, argparse._SubParsersAction)
        )
        lines += [".SS " + _roff(" ".join(path)) + (f" {positionals}" if positionals else "")]
        lines.append(_roff(sub.description or text or ""))
        for action in _options(sub):
            lines += [".TP", _option_line(action), _roff(_help_text(action))]
        if sub.epilog:
            lines += [".PP", _roff(sub.epilog)]
    lines += [
        ".SH ENVIRONMENT",
        ".TP",
        "\\fBTOKEND_SOCKET\\fR",
        "the native socket; default \\fI$XDG_RUNTIME_DIR/tokend/tokend.sock\\fR",
        ".SH FILES",
        ".TP",
        "\\fI$XDG_CONFIG_HOME/tokend/config.toml\\fR",
        "the daemon's configuration (docs/configuration.md)",
        ".SH SEE ALSO",
        "\\fBtokend\\fR(1), \\fBtokenctl\\fR(1), \\fBp11\\-kit\\fR(8), \\fBpinentry\\fR(1)",
        "",
    ]
    return "\n".join(lines)


# --- bash completion ----------------------------------------------------------------------


def completion(program: str) -> str:
    parser = PROGRAMS[program]()
    fn = f"_{program}_complete"
    cases = []
    top_words = [name for name, _, _ in _subparsers(parser)]
    top_opts = [flag for a in _options(parser) for flag in a.option_strings]
    cases.append(('""', top_words + top_opts + ["--help", "--version"]))
    for path, _, sub in _walk(parser):
        words = [name for name, _, _ in _subparsers(sub)]
        words += [flag for a in _options(sub) for flag in a.option_strings] + ["--help"]
        cases.append((f'"{" ".join(path)}"', words))
    commands = {" ".join(path) for path, _, _ in _walk(parser)}
    body = "\n".join(f'        {key}) words="{" ".join(sorted(set(ws)))}" ;;' for key, ws in cases)
    known = " ".join(sorted(f"'{c}'" for c in commands))
    return f"""# bash completion for {program} — generated by tools/gen_cli_docs.py; do not edit.
# Install: copy to /usr/share/bash-completion/completions/{program}
# (or ~/.local/share/bash-completion/completions/{program}).
{fn}() {{
    local cur path="" candidate word i
    cur="${{COMP_WORDS[COMP_CWORD]}}"
    # The command path so far: the longest run of words that names a known command.
    local -a known=({known})
    for ((i = 1; i < COMP_CWORD; i++)); do
        word="${{COMP_WORDS[i]}}"
        [[ $word == -* ]] && continue
        candidate="${{path:+$path }}$word"
        for k in "${{known[@]}}"; do
            if [[ $k == "$candidate" ]]; then path="$candidate"; break; fi
        done
    done
    local words=""
    case "$path" in
{body}
    esac
    COMPREPLY=($(compgen -W "$words" -- "$cur"))
    # Options that take a file: complete file names.
    if [[ ${{#COMPREPLY[@]}} -eq 0 ]]; then
        COMPREPLY=($(compgen -f -- "$cur"))
    fi
}}
complete -o filenames -F {fn} {program}
"""


def outputs() -> dict[Path, str]:
    files = {}
    for program in PROGRAMS:
        files[ROOT / "man" / f"{program}.1"] = man_page(program)
        files[ROOT / "completion" / f"{program}.bash"] = completion(program)
    return files


def main() -> int:
    for path, text in outputs().items():
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        print(f"wrote {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
