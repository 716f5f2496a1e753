"""The daemon's own PIN prompt: a GnuPG-family pinentry program (pinentry-curses,
-gnome3, -qt, -tty) spoken to over its Assuan protocol, one process per prompt, as
gpg-agent does. The PIN never passes through the mail client.

Assuan in the few words used here: the pinentry greets with ``OK``; each command line
(``SETDESC``, ``SETPROMPT``, ``SETERROR``, ``SETTIMEOUT``, ``OPTION``, ``GETPIN``,
``CONFIRM``, ``BYE``) is answered by ``OK``, ``ERR code text``, status lines (``S …``,
``#`` comments) and for GETPIN one ``D`` data line. Arguments and data are
percent-escaped (``%``, CR, LF and control bytes as ``%XX``).

Also here: `PinentryPrompter` (the `PinPrompter` seam) and `PolicyAuthorizer` (the
`Authorizer` seam: the configured policy, with confirmations rate-limited per window).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from typing import Any

from tokend.consent import (
    ClientInfo,
    PinRequest,
    Policy,
    Refusal,
    TokenDescription,
    Use,
    UseRequest,
)
from tokend.errors import FunctionCanceledError, FunctionRejectedError
from tokend.wipe import wipe

log = logging.getLogger(__name__)

#: Tried in this order when the configuration names no program: Debian's alternatives link
#: first (the user's choice), then the graphical ones, then the terminal ones.
PINENTRY_CANDIDATES = (
    "pinentry",
    "pinentry-gnome3",
    "pinentry-qt",
    "pinentry-gtk-2",
    "pinentry-curses",
    "pinentry-tty",
)

#: gpg-error codes (low 16 bits of the Assuan ERR code) that mean "the user did not answer".
_GPG_ERR_TIMEOUT = 62
_GPG_ERR_CANCELED = 99
_GPG_ERR_NOT_CONFIRMED = 114
#: Longest line a pinentry may send (the Assuan limit is 1000 bytes).
_MAX_LINE = 1000


def find_pinentry(configured: str | None = None) -> str | None:
    """The program to run: the configured one (must exist), else the first one found."""
    if configured:
        return configured if os.access(configured, os.X_OK) else shutil.which(configured)
    for name in PINENTRY_CANDIDATES:
        path = shutil.which(name)
        if path:
            return path
    return None


def escape(text: str) -> str:
    """Percent-escape an Assuan argument."""
    out = []
    for ch in text:
        if ch == "%" or ord(ch) < 0x20:
            out.append(f"%{ord(ch):02X}")
        else:
            out.append(ch)
    return "".join(out)


_HEX_DIGITS = b"0123456789abcdefABCDEF"


def unescape_into(data: bytes) -> bytearray:
    """Decode a percent-escaped data line into a fresh bytearray (the caller wipes it)."""
    out = bytearray()
    i = 0
    while i < len(data):
        if data[i] == 0x25:  # "%XX"
            digits = bytes(data[i + 1 : i + 3])
            # Exactly two hex digits: int() alone would also take "+1", " 1" or "_1".
            if len(digits) != 2 or not all(c in _HEX_DIGITS for c in digits):
                raise PinentryProtocolError("bad percent escape in a data line")
            out.append(int(digits, 16))
            i += 3
        else:
            out.append(data[i])
            i += 1
    return out


class PinentryProtocolError(FunctionCanceledError):
    """The pinentry said something that is not Assuan: the prompt counts as canceled (no PIN
    reached the token, so no retry was used)."""


@dataclass(frozen=True)
class PinentryOptions:
    program: str | None = None  # None: the first of PINENTRY_CANDIDATES found
    timeout: float = 60.0  # seconds a prompt stays open before it counts as canceled
    tty: str | None = None  # terminal for curses/tty pinentries (else $GPG_TTY)
    title: str = "tokend"


def _set_once(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _LineReader:
    """The pinentry's answers read straight into one bytearray that is wiped as lines are
    used, so the PIN's ``D`` line never sits in an immutable ``bytes`` (asyncio's
    StreamReader hands out ``bytes`` and keeps freed data in its buffer)."""

    def __init__(self, fd: int, capacity: int) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._buf = bytearray(capacity)
        self._start = 0  # first byte not yet handed out
        self._end = 0  # one past the last byte read

    async def readline(self, timeout: float) -> bytearray:
        """The next line without its end (a new bytearray the caller wipes); b"" at EOF."""
        loop = asyncio.get_running_loop()
        deadline = time.monotonic() + timeout
        while True:
            newline = self._buf.find(b"\n", self._start, self._end)
            if newline >= 0:
                end = (
                    newline - 1
                    if newline > self._start and self._buf[newline - 1] == 13
                    else newline
                )
                line = bytearray(memoryview(self._buf)[self._start : end])
                self._forget(newline + 1)
                return line
            if self._end == len(self._buf):
                if self._start == 0:
                    raise PinentryProtocolError("the pinentry sent an overlong line")
                self._compact()
            ready: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self._fd, _set_once, ready)
            try:
                await asyncio.wait_for(ready, max(deadline - time.monotonic(), 0.01))
            finally:
                loop.remove_reader(self._fd)
            try:
                count = os.readv(self._fd, [memoryview(self._buf)[self._end :]])
            except BlockingIOError:
                continue
            if count == 0:
                return bytearray()  # EOF
            self._end += count

    def _forget(self, upto: int) -> None:
        """Zero what was handed out; start over at the beginning when all of it was."""
        self._buf[self._start : upto] = bytes(upto - self._start)
        self._start = upto
        if self._start == self._end:
            self._start = self._end = 0

    def _compact(self) -> None:
        rest = self._end - self._start
        for i in range(rest):  # byte by byte: no temporary copy of what is left
            self._buf[i] = self._buf[self._start + i]
        self._buf[rest : self._end] = bytes(self._end - rest)
        self._start, self._end = 0, rest

    def close(self) -> None:
        wipe(self._buf)
        with contextlib.suppress(OSError):
            os.close(self._fd)


class Pinentry:
    """One pinentry process for one dialogue (a PIN or a confirmation)."""

    def __init__(self, options: PinentryOptions) -> None:
        self.options = options
        self._proc: asyncio.subprocess.Process | None = None
        self._lines: _LineReader | None = None

    async def __aenter__(self) -> Pinentry:
        program = find_pinentry(self.options.program)
        if program is None:
            raise FunctionCanceledError("no pinentry program found (install pinentry-curses)")
        env = dict(os.environ)
        tty = self.options.tty or env.get("GPG_TTY")
        read_end, write_end = os.pipe()
        try:
            self._proc = await asyncio.create_subprocess_exec(
                program,
                stdin=asyncio.subprocess.PIPE,
                stdout=write_end,
                stderr=asyncio.subprocess.DEVNULL,
                env=env,
            )
        except OSError as exc:
            os.close(read_end)
            raise FunctionCanceledError(f"cannot start {program}: {exc.strerror}") from None
        finally:
            os.close(write_end)  # the child has its copy: EOF when it exits
        self._lines = _LineReader(read_end, _MAX_LINE * 4)
        await self._expect_ok("greeting")
        if tty:
            await self.command(f"OPTION ttyname={tty}")
            await self.command(f"OPTION ttytype={env.get('TERM', 'dumb')}")
        await self.command(f"SETTITLE {escape(self.options.title)}")
        timeout = max(1, int(self.options.timeout))
        await self.command(f"SETTIMEOUT {timeout}")
        return self

    async def __aexit__(self, *exc: object) -> None:
        proc = self._proc
        if self._lines is not None:
            self._lines.close()
        if proc is None:
            return
        if proc.returncode is None and proc.stdin is not None:
            with contextlib.suppress(Exception):
                proc.stdin.write(b"BYE\n")
                await proc.stdin.drain()
            try:
                await asyncio.wait_for(proc.wait(), 1.0)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    async def _read_line(self, deadline: float) -> bytearray:
        assert self._lines is not None
        try:
            line = await self._lines.readline(deadline - time.monotonic())
        except TimeoutError:
            raise FunctionCanceledError("the PIN prompt timed out") from None
        if not line:
            raise FunctionCanceledError("the pinentry program went away")
        return line

    async def _expect_ok(self, what: str, data: bytearray | None = None) -> None:
        # The pinentry enforces its own timeout (SETTIMEOUT); ours is the backstop for a
        # pinentry that hangs without answering.
        deadline = time.monotonic() + self.options.timeout + 5.0
        while True:
            line = await self._read_line(deadline)
            try:
                if self._answer(line, what, data):
                    return
            finally:
                wipe(line)  # a D line holds the PIN

    def _answer(self, line: bytearray, what: str, data: bytearray | None) -> bool:
        """One answer line: True at OK; collects D data; raises at ERR or nonsense."""
        if line == b"OK" or line.startswith(b"OK "):
            return True
        if line.startswith(b"D ") and data is not None:
            decoded = unescape_into(memoryview(line)[2:])
            data += decoded
            wipe(decoded)
            return False
        if line.startswith((b"S ", b"#")) or line in (b"S", b"D"):
            return False
        if line.startswith(b"ERR "):
            code_text = line[4:].split(b" ", 1)[0]
            code = int(code_text) if code_text.isdigit() else 0
            if code & 0xFFFF == _GPG_ERR_TIMEOUT:
                raise FunctionCanceledError("the PIN prompt timed out")
            if code & 0xFFFF in (_GPG_ERR_CANCELED, _GPG_ERR_NOT_CONFIRMED):
                raise FunctionCanceledError("canceled at the prompt")
            raise FunctionCanceledError(f"the pinentry refused {what} (error {code})")
        raise PinentryProtocolError(f"unexpected pinentry answer to {what}")

    async def command(self, line: str) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write(line.encode() + b"\n")
            await self._proc.stdin.drain()
        except (BrokenPipeError, ConnectionResetError):
            raise FunctionCanceledError("the pinentry program went away") from None
        await self._expect_ok(line.split(" ", 1)[0])

    async def get_pin(self, description: str, prompt: str = "PIN:", error: str = "") -> bytearray:
        await self.command(f"SETDESC {escape(description)}")
        await self.command(f"SETPROMPT {escape(prompt)}")
        if error:
            await self.command(f"SETERROR {escape(error)}")
        assert self._proc is not None and self._proc.stdin is not None
        pin = bytearray()
        try:
            self._proc.stdin.write(b"GETPIN\n")
            await self._proc.stdin.drain()
            await self._expect_ok("GETPIN", pin)
        except BaseException:
            wipe(pin)
            raise
        return pin

    async def confirm(self, description: str) -> None:
        """Return when the user pressed OK; FunctionCanceledError otherwise."""
        await self.command(f"SETDESC {escape(description)}")
        await self.command("SETOK Allow")
        await self.command("SETCANCEL Deny")
        await self.command("CONFIRM")


def _describe(client: ClientInfo, token: TokenDescription, action: str) -> str:
    lines = [f"{client.name} {action}", f"Token: {token.name}"]
    if client.cmdline:
        command = client.command_line
        lines.insert(1, f"Command line: {command[:200]}")
    return "\n".join(lines)


class PinentryPrompter:
    """The `PinPrompter` seam: one pinentry dialogue per attempt; nothing cached."""

    def __init__(self, options: PinentryOptions) -> None:
        self.options = options
        self._one_at_a_time = asyncio.Lock()  # one prompt on the user's screen at a time

    async def ask_pin(self, request: PinRequest) -> bytearray:
        description = _describe(request.client, request.token, "asks for the token's PIN.")
        async with self._one_at_a_time, Pinentry(self.options) as pinentry:
            return await pinentry.get_pin(description, "PIN:", request.error)


class PolicyAuthorizer:
    """The `Authorizer` seam: the configured policy; a rule with `confirm = true` asks the
    user once per (program, token, use) and window, so a burst of mail asks once."""

    def __init__(
        self, policy: Policy, options: PinentryOptions, *, keep_refusals: int = 50
    ) -> None:
        self.policy = policy
        self.options = options
        self.refusals: collections.deque[Refusal] = collections.deque(maxlen=keep_refusals)
        self._confirmed: dict[tuple[str, str, Use], float] = {}
        self._one_at_a_time = asyncio.Lock()

    async def authorize(self, request: UseRequest) -> None:
        decision = self.policy.decide(request)
        if not decision.allowed:
            self._refuse(request, decision.reason)
        if not decision.confirm:
            return
        key = (request.client.exe, request.token.serial, request.use)
        async with self._one_at_a_time:
            if time.monotonic() < self._confirmed.get(key, float("-inf")):
                return
            description = _describe(
                request.client, request.token, f"wants to {request.use.value} with your token."
            )
            try:
                async with Pinentry(self.options) as pinentry:
                    await pinentry.confirm(description)
            except FunctionCanceledError as exc:
                self._refuse(request, f"{request.client.name}: not confirmed ({exc})")
            self._confirmed[key] = time.monotonic() + self.policy.confirm_window

    def _refuse(self, request: UseRequest, reason: str) -> None:
        log.warning("refused: %s", reason)
        self.refusals.append(
            Refusal(time.time(), request.client, request.token, request.use, reason)
        )
        raise FunctionRejectedError(reason)

    def describe(self) -> dict[str, Any]:
        return {
            "enforced": self.policy.enforced,
            "confirm_window": self.policy.confirm_window,
            "rules": self.policy.describe(),
            "refused": [
                {
                    "time": r.time,
                    "program": r.client.exe,
                    "pid": r.client.pid,
                    "token": r.token.serial,
                    "use": r.use.value,
                    "reason": r.reason,
                }
                for r in self.refusals
            ],
        }
