"""The PIN never passes through the mail client: `tokend serve` (a real process, configured
as a user would) asks through a real `pinentry-tty` on a pseudo-terminal that the test
holds, as a person at that terminal would see and answer it. Also the per-program policy:
who may decrypt, confirmations, refusals."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding

from tests.helpers import ID_9C, ID_9D, private_key
from tokend.client import Client
from tokend.errors import FunctionCanceledError, FunctionRejectedError, TokendError

PINENTRY = shutil.which("pinentry-tty")
pytestmark = pytest.mark.skipif(
    PINENTRY is None and not os.environ.get("CI"), reason="pinentry-tty not installed"
)
ROOT = Path(__file__).resolve().parent.parent
PIN = "123456"


class Terminal:
    """The user's terminal: a pty whose slave the pinentry draws on."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        self.name = os.ttyname(self.slave)
        self.screen = b""

    def wait_for(self, text: bytes, timeout: float = 15.0) -> str:
        deadline = time.monotonic() + timeout
        while text not in self.screen:
            remaining = deadline - time.monotonic()
            assert remaining > 0, f"no {text!r} on the terminal; it shows {self.screen!r}"
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                self.screen += os.read(self.master, 4096)
        shown = self.screen.decode(errors="replace")
        self.screen = b""
        return shown

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def close(self) -> None:
        for fd in (self.master, self.slave):
            with contextlib.suppress(OSError):
                os.close(fd)


@pytest.fixture
def terminal() -> Iterator[Terminal]:
    term = Terminal()
    yield term
    term.close()


def _serve(sock: Path, config: Path, export: Path) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [
            *(sys.executable, "-m", "tokend.cli.tokend_main", "serve", "--no-pcsc"),
            *("--simulate", "piv", "--socket", str(sock), "--config", str(config)),
            *("--export-dir", str(export)),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    seen = ""
    while " arrived " not in seen:  # the log line of the demo token's arrival
        line = proc.stdout.readline()
        assert line, seen
        seen += line
    return proc


@pytest.fixture
def daemon(tmp_path: Path, sock_path: Path, terminal: Terminal, request: pytest.FixtureRequest):
    extra = getattr(request, "param", "")
    config = tmp_path / "config.toml"
    config.write_text(
        "protected_authentication_path = true\n"
        f'pinentry_program = "{PINENTRY}"\n'
        f'pinentry_tty = "{terminal.name}"\n'
        "pinentry_timeout = 3\n" + extra
    )
    proc = _serve(sock_path, config, tmp_path)
    logs: list[str] = []
    reader = threading.Thread(target=lambda: logs.extend(proc.stdout or []), daemon=True)
    reader.start()
    yield sock_path, logs, tmp_path
    proc.send_signal(signal.SIGTERM)
    proc.wait(10)
    reader.join(5)
    assert PIN not in "".join(logs)  # the typed PIN never reaches a log line


def _decrypts(client: Client, session: int, export: Path) -> bytes:
    """Decrypt a key-transport blob made for the demo encryption certificate."""
    cert = x509.load_pem_x509_certificate((export / "encryption.pem").read_bytes())
    blob = cert.public_key().encrypt(b"content key", padding.PKCS1v15())  # type: ignore[union-attr]
    key = private_key(client, session, ID_9D)
    return client.decrypt(session, key, "CKM_RSA_PKCS", blob)


def _login_in_background(client: Client, session: int) -> tuple[threading.Thread, list]:
    outcome: list = []

    def run() -> None:
        try:
            client.login(session, None)
            outcome.append("ok")
        except TokendError as exc:
            outcome.append(exc)

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def _retries(client: Client, slot: int) -> int:
    status = client.call("tokend_GetTokenStatus", {"slot_id": slot})
    return int(status["status"]["pin_retries"])


def test_mail_client_logs_in_without_ever_sending_the_pin(daemon, terminal: Terminal) -> None:
    sock, _logs, export = daemon
    with Client(sock) as client:
        slot = client.slot_list(token_present=True)[0]
        info = client.token_info(slot)
        assert "CKF_PROTECTED_AUTHENTICATION_PATH" in info["flags"]
        session = client.open_session(slot)
        thread, outcome = _login_in_background(client, session)
        screen = terminal.wait_for(b"PIN:")
        # The prompt names the program that asks and the token.
        assert os.path.realpath(sys.executable) in screen or "python" in screen
        assert f"pid {os.getpid()}" in screen
        assert info["label"] in screen and info["token_serial"] in screen
        terminal.type(PIN + "\n")
        thread.join(15)
        assert outcome == ["ok"]
        assert _decrypts(client, session, export) == b"content key"


def test_wrong_pin_then_right_one_shows_the_retries_left(daemon, terminal: Terminal) -> None:
    sock, _logs, _export = daemon
    with Client(sock) as client:
        slot = client.slot_list(token_present=True)[0]
        session = client.open_session(slot)
        before = _retries(client, slot)
        thread, outcome = _login_in_background(client, session)
        terminal.wait_for(b"PIN:")
        terminal.type("000000\n")
        screen = terminal.wait_for(b"PIN:")
        assert f"Wrong PIN, {before - 1} tries left" in screen
        terminal.type(PIN + "\n")
        thread.join(15)
        assert outcome == ["ok"]
        # A right PIN resets the counter (the card's own behaviour, seen through tokend).
        assert _retries(client, slot) == before


def test_cancel_leaves_the_token_unchanged(daemon, terminal: Terminal) -> None:
    sock, _logs, _export = daemon
    with Client(sock) as client, Client(sock) as other:
        slot = client.slot_list(token_present=True)[0]
        before = _retries(client, slot)
        session = client.open_session(slot)
        thread, outcome = _login_in_background(client, session)
        terminal.wait_for(b"PIN:")
        terminal.type("\x04")  # Ctrl-D at the prompt: cancel
        thread.join(15)
        assert len(outcome) == 1 and isinstance(outcome[0], FunctionCanceledError)
        assert _retries(client, slot) == before
        state = client.call("C_GetSessionInfo", {"h_session": session})["info"]["state"]
        assert state == "CKS_RO_PUBLIC_SESSION"  # not logged in
        assert other.slot_list(token_present=True) == [slot]


def test_timeout_cancels_and_the_daemon_keeps_serving(daemon, terminal: Terminal) -> None:
    sock, _logs, _export = daemon
    with Client(sock) as client, Client(sock) as other:
        slot = client.slot_list(token_present=True)[0]
        before = _retries(client, slot)
        session = client.open_session(slot)
        thread, outcome = _login_in_background(client, session)
        terminal.wait_for(b"PIN:")
        # Nobody answers; while the prompt waits, other clients are served.
        started = time.monotonic()
        assert other.slot_list(token_present=True) == [slot]
        assert time.monotonic() - started < 1.0
        thread.join(20)
        assert len(outcome) == 1 and isinstance(outcome[0], FunctionCanceledError)
        assert "timed out" in str(outcome[0])
        assert _retries(client, slot) == before


def test_a_pinentry_that_dies_cancels_cleanly(
    tmp_path: Path, sock_path: Path, terminal: Terminal
) -> None:
    dying = tmp_path / "pinentry-dies"
    # Greets like a pinentry, then exits in the middle of the dialogue.
    dying.write_text("#!/bin/sh\necho 'OK Pleased to meet you'\nread line\nexit 3\n")
    dying.chmod(0o755)
    config = tmp_path / "config.toml"
    config.write_text(f'protected_authentication_path = true\npinentry_program = "{dying}"\n')
    proc = _serve(sock_path, config, tmp_path)
    try:
        with Client(sock_path) as client:
            slot = client.slot_list(token_present=True)[0]
            before = _retries(client, slot)
            session = client.open_session(slot)
            with pytest.raises(FunctionCanceledError, match="went away"):
                client.login(session, None)
            assert _retries(client, slot) == before
            client.login(session, PIN)  # a PIN given by the client still works
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


def test_without_protected_path_a_missing_pin_is_a_clear_error(
    tmp_path: Path, sock_path: Path
) -> None:
    config = tmp_path / "config.toml"
    config.write_text("")
    proc = _serve(sock_path, config, tmp_path)
    try:
        with Client(sock_path) as client:
            slot = client.slot_list(token_present=True)[0]
            assert "CKF_PROTECTED_AUTHENTICATION_PATH" not in client.token_info(slot)["flags"]
            session = client.open_session(slot)
            with pytest.raises(TokendError, match="no PIN given"):
                client.login(session, None)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(10)


# --- the per-program policy ------------------------------------------------------------------

ALLOWED_PROGRAM = os.path.realpath(sys.executable)


def _as_other_program(tmp_path: Path, name: str) -> Path:
    """A second executable (a copy of this Python under another name): the daemon tells it
    apart by /proc/PID/exe, as it would tell a browser plug-in from the mail client."""
    program = tmp_path / name
    shutil.copy2(ALLOWED_PROGRAM, program)
    return program


_OTHER_CLIENT = """
import sys
from pathlib import Path
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import padding
from tokend.client import Client
from tokend.errors import TokendError
sock, export = sys.argv[1], Path(sys.argv[2])
cert = x509.load_pem_x509_certificate((export / "encryption.pem").read_bytes())
blob = cert.public_key().encrypt(b"content key", padding.PKCS1v15())
with Client(sock) as c:
    slot = c.slot_list(token_present=True)[0]
    s = c.open_session(slot)
    c.login(s, "123456")
    (key,) = c.find_objects(s, {"CKA_CLASS": "CKO_PRIVATE_KEY", "CKA_ID": b"\\x03"})
    try:
        print("PLAINTEXT", c.decrypt(s, key, "CKM_RSA_PKCS", blob))
    except TokendError as exc:
        print("REFUSED", exc.ckr_name, exc)
"""


_OTHER_DERIVE = """
import sys
from pathlib import Path
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from tokend.client import Client
from tokend.errors import TokendError
from tokend.model import Ecdh1DeriveParams, Mechanism
from tokend.pkcs11 import CKD, CKM
sock, export = sys.argv[1], Path(sys.argv[2])
cert = x509.load_pem_x509_certificate((export / "authentication.pem").read_bytes())
ephemeral = ec.generate_private_key(ec.SECP256R1())
point = ephemeral.public_key().public_bytes(Encoding.X962, PublicFormat.UncompressedPoint)
expected = ephemeral.exchange(ec.ECDH(), cert.public_key())
with Client(sock) as c:
    slot = c.slot_list(token_present=True)[0]
    s = c.open_session(slot)
    c.login(s, "123456")
    (key,) = c.find_objects(s, {"CKA_CLASS": "CKO_PRIVATE_KEY", "CKA_ID": b"\\x01"})
    try:
        mech = Mechanism(CKM.CKM_ECDH1_DERIVE, Ecdh1DeriveParams(CKD.CKD_NULL, point))
        secret = c.derive(s, key, mech)
        print("DERIVED", secret == expected)
    except TokendError as exc:
        print("REFUSED", exc.ckr_name, exc)
"""


def _env() -> dict[str, str]:
    site = [p for p in sys.path if p.endswith("site-packages")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), *site]))


def _run_other(program: Path, sock: Path, export: Path, script: str = _OTHER_CLIENT) -> str:
    env = _env()
    result = subprocess.run(
        [str(program), "-c", script, str(sock), str(export)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


POLICY = f"""
[[policy]]
program = "{ALLOWED_PROGRAM}"
tokens = ["*"]
operations = ["decrypt", "sign", "derive"]
"""


@pytest.mark.parametrize("daemon", [POLICY], indirect=True)
def test_a_program_the_policy_does_not_allow_cannot_decrypt(
    daemon, terminal: Terminal, tmp_path: Path
) -> None:
    sock, logs, export = daemon
    with Client(sock) as mail_client:
        slot = mail_client.slot_list(token_present=True)[0]
        session = mail_client.open_session(slot)
        mail_client.login(session, PIN)
        # The allowed program decrypts ...
        assert _decrypts(mail_client, session, export) == b"content key"
        # ... and while it is logged in, another program of the same user cannot.
        intruder = _as_other_program(tmp_path, "not-the-mail-client")
        out = _run_other(intruder, sock, export)
        assert "PLAINTEXT" not in out
        assert "REFUSED CKR_FUNCTION_REJECTED" in out and "no policy rule allows it" in out
        # tokenctl's view: the policy and the refusal, naming the program.
        view = mail_client.call("tokend_GetPolicy", {})
        assert view["enforced"] and view["rules"][0]["program"] == ALLOWED_PROGRAM
        assert view["refused"][-1]["program"] == str(intruder)
        assert view["refused"][-1]["use"] == "decrypt"
        # ... and the allowed program is still served.
        assert _decrypts(mail_client, session, export) == b"content key"
    time.sleep(0.2)
    assert any("refused" in line and "not-the-mail-client" in line for line in logs)


CONFIRMING = f"""
confirm_window = 60
[[policy]]
program = "{ALLOWED_PROGRAM}"
operations = ["decrypt"]
confirm = true
"""


@pytest.mark.parametrize("daemon", [CONFIRMING], indirect=True)
def test_confirmation_is_asked_once_per_window_and_deny_refuses(
    daemon, terminal: Terminal, tmp_path: Path
) -> None:
    sock, _logs, export = daemon
    with Client(sock) as client:
        slot = client.slot_list(token_present=True)[0]
        session = client.open_session(slot)
        client.login(session, PIN)
        result: list = []

        def decrypt() -> None:
            try:
                result.append(_decrypts(client, session, export))
            except TokendError as exc:
                result.append(exc)

        # First use: the prompt names program, token and use; the user denies.
        thread = threading.Thread(target=decrypt)
        thread.start()
        screen = terminal.wait_for(b"?")
        assert "wants to decrypt" in screen and f"pid {os.getpid()}" in screen
        terminal.type("d\n")  # "Deny"
        thread.join(15)
        assert isinstance(result.pop(), FunctionRejectedError)
        # Next use: asked again; allowed this time.
        thread = threading.Thread(target=decrypt)
        thread.start()
        terminal.wait_for(b"?")
        terminal.type("a\n")  # "Allow"
        thread.join(15)
        assert result.pop() == b"content key"
        # A burst within the window asks nothing more.
        for _ in range(5):
            assert _decrypts(client, session, export) == b"content key"
        assert terminal.screen == b""
        # Signing is not in the rule: refused without a prompt.
        with pytest.raises(FunctionRejectedError):
            (key,) = client.find_objects(session, {"CKA_CLASS": "CKO_PRIVATE_KEY", "CKA_ID": ID_9C})
            client.sign(session, key, "CKM_SHA256_RSA_PKCS", b"mail")


def test_a_bad_policy_fails_at_start_naming_file_and_key(tmp_path: Path, sock_path: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text('[[policy]]\nprogram = "/usr/bin/x"\noperations = ["decrypt", "fly"]\n')
    result = subprocess.run(
        [
            *(sys.executable, "-m", "tokend.cli.tokend_main", "serve", "--no-pcsc"),
            *("--socket", str(sock_path), "--config", str(config)),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 1
    assert str(config) in result.stderr and "policy[0].operations" in result.stderr


@pytest.mark.parametrize("daemon", [POLICY], indirect=True)
def test_tokenctl_policy_shows_rules_and_refusals(daemon, tmp_path: Path) -> None:
    sock, _logs, export = daemon
    _run_other(_as_other_program(tmp_path, "sneaky"), sock, export)
    result = subprocess.run(
        [sys.executable, "-m", "tokend.cli.tokenctl", "--socket", str(sock), "policy"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 0, result.stderr
    assert "protected authentication path): on" in result.stdout
    assert f"{ALLOWED_PROGRAM}: decrypt, derive, sign on *" in result.stdout
    assert "sneaky" in result.stdout and ": decrypt" in result.stdout


async def test_the_pin_answer_leaves_nothing_in_the_read_buffer() -> None:
    """The pinentry's D line (the PIN) is read into tokend's own buffer and zeroed there
    once used: no copy of the PIN stays behind in a reader (asyncio's StreamReader would
    keep it in immutable bytes). Lines may end in CRLF; an overlong one is refused."""
    from tokend.pinentry import PinentryProtocolError, _LineReader

    read_end, write_end = os.pipe()
    reader = _LineReader(read_end, 64)
    try:
        os.write(write_end, b"OK Pleased to meet you\r\nD 12%253456\nOK\n")
        assert await reader.readline(2) == b"OK Pleased to meet you"
        line = await reader.readline(2)
        assert line == b"D 12%253456"
        assert b"3456" not in reader._buf  # zeroed as soon as it was handed out
        assert await reader.readline(2) == b"OK"
        assert not any(reader._buf)
        os.write(write_end, b"S " + b"x" * 80 + b"\n")
        with pytest.raises(PinentryProtocolError):
            await reader.readline(2)
        os.close(write_end)
        write_end = -1
    finally:
        reader.close()
        if write_end >= 0:
            os.close(write_end)
    assert not any(reader._buf)


@pytest.mark.parametrize("daemon", [POLICY], indirect=True)
def test_a_program_the_policy_does_not_allow_cannot_derive(daemon, tmp_path: Path) -> None:
    """C_DeriveKey (ECDH with the 9A key) is a private-key use like decrypt: the allowed
    program derives the agreed secret, another program of the same user is refused."""
    sock, logs, export = daemon
    assert _run_other(Path(ALLOWED_PROGRAM), sock, export, _OTHER_DERIVE).strip() == (
        "DERIVED True"
    )
    intruder = _as_other_program(tmp_path, "not-the-mail-client")
    out = _run_other(intruder, sock, export, _OTHER_DERIVE)
    assert "DERIVED" not in out
    assert "REFUSED CKR_FUNCTION_REJECTED" in out and "no policy rule allows it" in out
    with Client(sock) as client:
        assert client.call("tokend_GetPolicy", {})["refused"][-1]["use"] == "derive"
    time.sleep(0.2)
    assert any("refused" in line and "may not derive" in line for line in logs)


# The word for the operation is "provisioning"; "provision" works as well.
PROVISIONING_POLICY = f"""
[[policy]]
program = "{ALLOWED_PROGRAM}"
operations = ["decrypt", "provisioning"]
"""


# The copy of Python is outside the venv: it gets the venv's site directories with their
# .pth files (the editable install maps tokend.drivers to drivers/), then runs tokenctl.
_TOKENCTL = (
    "import os, runpy, site, sys; "
    "[site.addsitedir(p) for p in os.environ['TOKEND_TEST_SITE'].split(os.pathsep)]; "
    "sys.argv[0] = 'tokenctl'; runpy.run_module('tokend.cli.tokenctl', run_name='__main__')"
)


def _tokenctl_as(program: Path, sock: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`tokenctl` run by ``program`` (a Python), the PIN on a pipe as a script would give it."""
    site = [p for p in sys.path if p.endswith("site-packages")]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run(
        [str(program), "-c", _TOKENCTL, "--socket", str(sock), *args],
        input=f"{PIN}\n",
        capture_output=True,
        text=True,
        env={**env, "TOKEND_TEST_SITE": os.pathsep.join(site)},
        timeout=60,
    )


def _signing_slot(program: Path, sock: Path) -> dict:
    import json

    status = _tokenctl_as(program, sock, "status", "--json")
    assert status.returncode == 0, status.stderr
    (slot,) = [s for s in json.loads(status.stdout)["status"]["slots"] if s["slot"] == "9c"]
    return slot


@pytest.mark.parametrize("daemon", [PROVISIONING_POLICY], indirect=True)
def test_only_a_program_the_policy_allows_can_provision(daemon, tmp_path: Path) -> None:
    """`tokenctl keys generate` from a program without `provisioning` in a rule is refused
    and changes nothing on the token; the program the rule names generates the key."""
    sock, logs, export = daemon
    generate = ("keys", "generate", "--slot", "sign", "--alg", "p256", "--pin-fd", "0")
    allowed = Path(ALLOWED_PROGRAM)
    before = _signing_slot(allowed, sock)

    intruder = _as_other_program(tmp_path, "not-the-admin-tool")
    refused = _tokenctl_as(intruder, sock, *generate)
    assert refused.returncode != 0 and "BEGIN PUBLIC KEY" not in refused.stdout
    assert "no policy rule allows it" in refused.stderr, refused.stderr
    assert _signing_slot(allowed, sock) == before  # the token is unchanged
    with Client(sock) as client:
        last = client.call("tokend_GetPolicy", {})["refused"][-1]
        assert (last["program"], last["use"]) == (str(intruder), "provision")

    done = _tokenctl_as(allowed, sock, *generate)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("-----BEGIN PUBLIC KEY-----")
    # A new key: the demo certificate went with the old one.
    assert before["certificate"] is not None
    assert _signing_slot(allowed, sock)["certificate"] is None

    # derive is in no rule: refused even for the program the rule names.
    refused_derive = _run_other(allowed, sock, export, _OTHER_DERIVE)
    assert "REFUSED CKR_FUNCTION_REJECTED" in refused_derive
    time.sleep(0.2)
    assert any("refused" in line and "not-the-admin-tool" in line for line in logs)
