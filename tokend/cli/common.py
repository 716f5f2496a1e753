"""Shared CLI plumbing: exit codes, PIN input without echo, one-line errors."""

from __future__ import annotations

import getpass
import os
import re
import sys
from typing import NoReturn

from tokend.errors import (
    DeviceMemoryError,
    DeviceRemovedError,
    FunctionNotSupportedError,
    PinIncorrectError,
    PinLockedError,
    TokendError,
    TokenNotPresentError,
    UserNotLoggedInError,
)
from tokend.wipe import wipe

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2
#: A PIN, PUK, password or management key read from a descriptor is one short line.
MAX_SECRET_BYTES = 1024


class UsageError(Exception):
    pass


class DaemonUnreachable(Exception):
    """The daemon's socket cannot be reached."""


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    print(f"{os.path.basename(sys.argv[0]) or 'tokenctl'}: {message}", file=sys.stderr)
    raise SystemExit(code)


def explain(exc: BaseException) -> str:
    """One line that says what went wrong and what to do next."""
    credential = getattr(exc, "credential", "pin")
    if isinstance(exc, PinLockedError):
        if credential == "puk":
            return (
                "PUK blocked: the PIN cannot be unblocked any more; once the PIN is blocked "
                "too, reset the token (all keys are lost): tokenctl reset"
            )
        return "PIN blocked: unblock it with the PUK: tokenctl pin unblock"
    if isinstance(exc, PinIncorrectError):
        if credential == "management_key":
            return (
                "wrong management key: give the token's key with --mgmt-key-file FILE or "
                "--mgmt-key-fd FD (hex)"
            )
        left = getattr(exc, "retries", None)
        what = "PUK" if credential == "puk" else "PIN"
        if left == 0:
            if what == "PUK":
                return "wrong PUK; the PUK is now blocked: tokenctl reset is what is left"
            return (
                "wrong PIN; the PIN is now blocked: unblock it with the PUK: tokenctl pin unblock"
            )
        return f"wrong {what}" + (f" ({left} tries left)" if left is not None else "")
    if isinstance(exc, DeviceRemovedError | TokenNotPresentError):
        return "the token is not there (removed?): plug it in and try again"
    if isinstance(exc, UserNotLoggedInError):
        return f"not logged in: {_human(exc)}"
    if isinstance(exc, DeviceMemoryError):
        return f"token full: {_human(exc)}"
    if isinstance(exc, FunctionNotSupportedError):
        return f"this token cannot do that: {_human(exc)}"
    if isinstance(exc, TokendError):
        return _human(exc)
    if isinstance(exc, DaemonUnreachable):
        return (
            f"cannot reach tokend at {exc} (is it running? start it with `tokend serve`, or "
            "set TOKEND_SOCKET / --socket)"
        )
    return str(exc) or type(exc).__name__


_CKR_PREFIX = re.compile(r"^CKR_[A-Z0-9_]+: ")


def _human(exc: BaseException) -> str:
    """The daemon's message without its machine prefix ("CKR_TEMPLATE_INCONSISTENT: …")."""
    text = _CKR_PREFIX.sub("", str(exc), count=1)
    return text or str(exc)


def read_secret(
    prompt: str, fd: int | None = None, *, confirm: bool = False, option: str = "--pin-fd"
) -> str:
    """Read a PIN/password from file descriptor ``fd`` (scripts: one secret per line, so
    several can come through one descriptor) or from the terminal without echo."""
    if fd is not None:
        data = bytearray()
        try:
            while not data.endswith(b"\n"):
                if len(data) > MAX_SECRET_BYTES:
                    data[:] = bytes(len(data))
                    raise UsageError(f"{option} {fd}: no line end within {MAX_SECRET_BYTES} bytes")
                chunk = os.read(fd, 1)
                if not chunk:
                    break
                data += chunk
        except OSError as exc:
            raise UsageError(f"cannot read {option} {fd}: {exc.strerror}") from None
        try:
            return data.decode().rstrip("\r\n")
        finally:
            wipe(data)
    if not sys.stdin.isatty():
        raise UsageError(f"{prompt.strip(': ')}: no terminal to prompt on; use {option}")
    value = getpass.getpass(prompt)
    if confirm and getpass.getpass("Again: ") != value:
        raise UsageError("the two entries differ")
    return value


def confirm(question: str, assume_yes: bool) -> bool:
    """Ask y/N on the terminal; without one, only ``--yes`` confirms."""
    if assume_yes:
        return True
    if not sys.stdin.isatty():
        raise UsageError(f"{question} — no terminal to ask on; add --yes to confirm")
    answer = input(f"{question} [y/N] ").strip().lower()
    return answer in ("y", "yes")
