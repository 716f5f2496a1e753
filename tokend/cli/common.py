"""Shared CLI plumbing: exit codes, PIN input without echo, one-line errors."""

from __future__ import annotations

import getpass
import os
import sys
from typing import NoReturn

from tokend.errors import (
    DeviceRemovedError,
    PinIncorrectError,
    PinLockedError,
    TokendError,
    TokenNotPresentError,
    UserNotLoggedInError,
)

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    pass


def fail(message: str, code: int = EXIT_FAILED) -> NoReturn:
    print(f"{os.path.basename(sys.argv[0]) or 'tokenctl'}: {message}", file=sys.stderr)
    raise SystemExit(code)


def explain(exc: BaseException) -> str:
    """One line that says what went wrong and what to do next."""
    if isinstance(exc, PinLockedError):
        return "PIN blocked: unblock it with the PUK: tokenctl pin unblock"
    if isinstance(exc, PinIncorrectError):
        left = getattr(exc, "retries", None)
        return "wrong PIN" + (f" ({left} tries left)" if left is not None else "")
    if isinstance(exc, DeviceRemovedError | TokenNotPresentError):
        return "the token is not there (removed?): plug it in and try again"
    if isinstance(exc, UserNotLoggedInError):
        return f"not logged in: {exc}"
    if isinstance(exc, TokendError):
        return str(exc)
    if isinstance(exc, FileNotFoundError | ConnectionRefusedError):
        return (
            "cannot reach tokend (is it running? start it with `tokend serve`, or set "
            "TOKEND_SOCKET / --socket)"
        )
    return str(exc) or type(exc).__name__


def read_secret(prompt: str, fd: int | None = None, *, confirm: bool = False) -> str:
    """Read a PIN/password from file descriptor ``fd`` (scripts) or the terminal, no echo."""
    if fd is not None:
        data = b""
        while not data.endswith(b"\n"):
            chunk = os.read(fd, 1)
            if not chunk:
                break
            data += chunk
        return data.decode().rstrip("\r\n")
    if not sys.stdin.isatty():
        raise UsageError(f"{prompt.strip(': ')}: no terminal to prompt on; use --pin-fd")
    value = getpass.getpass(prompt)
    if confirm and getpass.getpass("Again: ") != value:
        raise UsageError("the two entries differ")
    return value
