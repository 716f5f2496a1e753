"""Issue 9's adversarial findings, each kept as its reproduction (docs/threat-model.md
points here). Tests that need another local user create one (`useradd`, removed again)
and run the attacker's side as that user in a subprocess (os.setuid); they skip only
when not run as root."""

from __future__ import annotations

import base64
import json
import os
import pwd
import resource
import secrets
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import pkcs12

from tests.conftest import RunningDaemon, stop_daemon, wait_for_token
from tests.helpers import ID_9D, PIN, pkcs1_blob, private_key
from tokend.cli.tokenctl import main as tokenctl
from tokend.client import AsyncClient, Client, UntrustedServerError
from tokend.errors import (
    FunctionFailedError,
    PinIncorrectError,
    UserNotLoggedInError,
)
from tokend.limits import Limits
from tokend.pkcs11 import CKA
from tokend.socket_security import InsecurePathError, secure_socket_directory
from tokend.testing import start_thread_daemon

ROOT = Path(__file__).resolve().parent.parent
#: The attacker's interpreter: only the stdlib is needed, and a checkout's venv may live
#: under a home directory the other user cannot read; the system Python can be read.
_ATTACKER_PYTHON = shutil.which("python3", path="/usr/bin:/bin") or sys.executable
needs_root = pytest.mark.skipif(os.getuid() != 0, reason="needs root to create a second user")

# --- the second local user ---------------------------------------------------------------


@dataclass(frozen=True)
class OtherUser:
    name: str
    uid: int
    gid: int

    def run(self, script: str, *args: str, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            self._argv(script, args), capture_output=True, text=True, timeout=timeout
        )

    def start(self, script: str, *args: str) -> subprocess.Popen:
        return subprocess.Popen(
            self._argv(script, args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )

    def _argv(self, script: str, args: tuple[str, ...]) -> list[str]:
        # The attacker's code drops to the other user first, then runs: os.setuid in the
        # subprocess itself, so nothing of root's survives into it.
        prelude = (
            "import os, sys\n"
            "os.setgroups([]); os.setgid(int(sys.argv[2])); os.setuid(int(sys.argv[1]))\n"
            "assert os.getuid() != 0\n"
            "args = sys.argv[3:]\n"
        )
        return [_ATTACKER_PYTHON, "-I", "-c", prelude + script, str(self.uid), str(self.gid), *args]


@pytest.fixture
def other_user() -> Iterator[OtherUser]:
    name = f"tkd9{secrets.token_hex(4)}"
    subprocess.run(
        ["useradd", "--no-create-home", "--no-user-group", "--shell", "/usr/sbin/nologin", name],
        check=True,
        capture_output=True,
    )
    try:
        entry = pwd.getpwnam(name)
        yield OtherUser(name, entry.pw_uid, entry.pw_gid)
    finally:
        subprocess.run(["userdel", name], check=False, capture_output=True)


@pytest.fixture
def shared_tmp() -> Iterator[Path]:
    """A directory like /tmp (root-owned, 1777, sticky) that only this test uses, in a
    system temporary directory the other user can reach."""
    parents = [p for p in ("/tmp", "/var/tmp", "/dev/shm") if os.stat(p).st_mode & 0o1777 == 0o1777]
    if not parents:
        pytest.skip("no world-writable sticky temporary directory for the other user")
    base = Path(tempfile.mkdtemp(prefix="t9-", dir=parents[0]))
    os.chmod(base, 0o1777)
    try:
        yield base
    finally:
        shutil.rmtree(base, ignore_errors=True)


def _serve_argv(*extra: str) -> list[str]:
    return [sys.executable, "-m", "tokend.cli.tokend_main", "serve", "--no-pcsc", *extra]


def _fallback_env(shared_tmp: Path) -> dict[str, str]:
    """No runtime directory: tokend falls back to $TMPDIR/tokend-$UID (here: shared_tmp)."""
    env = dict(os.environ)
    env.pop("TOKEND_SOCKET", None)
    env["XDG_RUNTIME_DIR"] = str(shared_tmp / "no-runtime-dir")
    env["TMPDIR"] = str(shared_tmp)
    return env


def _wait_for_socket(proc: subprocess.Popen, path: Path) -> None:
    deadline = time.monotonic() + 20
    while not path.exists():  # a new process: nothing to wait on but the file
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "tokend did not start"
        time.sleep(0.02)


def _stop(proc: subprocess.Popen) -> str:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        out, err = proc.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
    return (out or "") + (err or "")


# --- 1. PIN capture through the fallback directory ---------------------------------------


@needs_root
def test_fallback_directory_pre_created_by_another_user_is_refused(other_user, shared_tmp):
    victim_dir = shared_tmp / f"tokend-{os.getuid()}"
    made = other_user.run("os.mkdir(args[0]); os.chmod(args[0], 0o777)", str(victim_dir))
    assert made.returncode == 0, made.stderr
    proc = subprocess.run(
        _serve_argv("--simulate", "piv"),
        env=_fallback_env(shared_tmp),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert f"{victim_dir} belongs to uid {other_user.uid}" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1  # one clear line, no traceback
    assert os.listdir(victim_dir) == []  # nothing of the victim's went into it


@needs_root
def test_under_umask_000_every_directory_is_0700_and_cannot_be_swapped(other_user, shared_tmp):
    deep = shared_tmp / "deep" / "new" / "path" / "tokend.sock"
    for argv, env, sock in (
        (
            _serve_argv(),
            _fallback_env(shared_tmp),
            shared_tmp / f"tokend-{os.getuid()}" / "tokend" / "tokend.sock",
        ),
        (_serve_argv("--socket", str(deep)), dict(os.environ), deep),
    ):
        proc = subprocess.Popen(
            argv, env=env, umask=0, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            _wait_for_socket(proc, sock)
            created = [sock.parent]
            while created[-1].parent != shared_tmp:
                created.append(created[-1].parent)
            for directory in created:
                st = directory.lstat()
                assert stat.S_IMODE(st.st_mode) == 0o700, directory
                assert st.st_uid == os.getuid()
            assert stat.S_IMODE(sock.stat().st_mode) == 0o600
            # The attack: rename the socket's directory away and put one's own in its place.
            attack = other_user.run(
                "import errno\n"
                "for src in args:\n"
                "    try:\n"
                "        os.rename(src, src + '.gone'); print('renamed', src)\n"
                "    except OSError as exc:\n"
                "        print(errno.errorcode[exc.errno])\n",
                str(sock.parent),
                str(created[-1]),
            )
            assert attack.stdout.split() == ["EACCES", "EPERM"], attack.stdout + attack.stderr
            with Client(sock) as client:
                assert client.slot_list() == []
        finally:
            out = _stop(proc)
        assert proc.returncode == 0, out


ATTACKER_SERVER = """
import json, socket, os
path = args[0]
os.makedirs(os.path.dirname(path), exist_ok=True)
os.chmod(os.path.dirname(path), 0o755)
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
os.chmod(path, 0o777)
srv.listen(8)
srv.settimeout(20)
print("ready", flush=True)
got = []
for _ in range(int(args[1])):
    conn, _ = srv.accept()
    conn.settimeout(5)
    data = b""
    try:
        while chunk := conn.recv(65536):
            data += chunk
    except OSError:
        pass
    got.append(data.decode("latin-1"))
    conn.close()
print(json.dumps(got), flush=True)
"""


@needs_root
def test_clients_refuse_a_socket_served_by_another_user(other_user, shared_tmp, capsys):
    (shared_tmp / "evil").mkdir()
    os.chown(shared_tmp / "evil", other_user.uid, other_user.gid)
    path = shared_tmp / "evil" / "tokend" / "tokend.sock"
    attacker = other_user.start(ATTACKER_SERVER, str(path), "3")
    try:
        assert attacker.stdout is not None
        assert attacker.stdout.readline().strip() == "ready", attacker.communicate()
        # What a mail client does: connect and log in. It must fail before sending.
        with pytest.raises(UntrustedServerError) as refused, Client(path, timeout=5) as client:
            client.login(1, PIN)
        assert f"uid {other_user.uid}" in str(refused.value)

        async def async_client() -> None:
            with pytest.raises(UntrustedServerError):
                await AsyncClient.connect(path)

        import asyncio

        asyncio.run(async_client())
        rc = tokenctl(["--socket", str(path), "list"])
        err = capsys.readouterr().err
        assert rc == 1 and f"served by uid {other_user.uid}" in err, err
        got = json.loads(attacker.communicate(timeout=30)[0])
    finally:
        if attacker.poll() is None:
            attacker.kill()
            attacker.wait()
    assert got == ["", "", ""]  # three connections, not one byte (let alone the PIN)


# --- 2. symbolic links ---------------------------------------------------------------------


@needs_root
def test_a_link_in_another_users_directory_is_not_followed(other_user, shared_tmp):
    victim = shared_tmp / "victim-dir"
    victim.mkdir(mode=0o755)
    os.chmod(victim, 0o755)
    attacker_dir = shared_tmp / "attacker"
    linked = other_user.run(
        "os.mkdir(args[0], 0o755); os.symlink(args[1], os.path.join(args[0], 'tokend'))\n"
        "os.symlink(args[1], args[2])\n",
        str(attacker_dir),
        str(victim),
        str(shared_tmp / f"tokend-{os.getuid()}"),
    )
    assert linked.returncode == 0, linked.stderr
    cases = [
        # --socket through the attacker's directory (its link points at the victim's dir)
        (_serve_argv("--socket", str(attacker_dir / "tokend" / "tokend.sock")), dict(os.environ)),
        # the classic /tmp link: $TMPDIR/tokend-$UID made by the attacker as a link
        (_serve_argv(), _fallback_env(shared_tmp)),
    ]
    for argv, env in cases:
        proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
        assert proc.returncode == 1, proc.stderr
        assert f"uid {other_user.uid}" in proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
        assert stat.S_IMODE(victim.stat().st_mode) == 0o755  # never chmod-ed through a link
        assert list(victim.iterdir()) == []  # and nothing served there


def test_own_links_are_followed_and_the_real_directory_is_checked() -> None:
    real = Path(tempfile.mkdtemp(prefix="t9-"))
    try:
        link = real.parent / f"{real.name}-link"
        link.symlink_to(real)
        assert secure_socket_directory(link / "tokend") == real / "tokend"
        assert stat.S_IMODE((real / "tokend").stat().st_mode) == 0o700
        os.chmod(real / "tokend", 0o777)  # someone could have put anything in it
        with pytest.raises(InsecurePathError, match="writable by group or others"):
            secure_socket_directory(link / "tokend")
    finally:
        link.unlink()
        shutil.rmtree(real)


def test_a_socket_directly_in_tmp_leaves_tmp_alone() -> None:
    # The old check chmod-ed the socket's directory to 0700 whenever the daemon's user
    # owned it: as root, `--socket /tmp/x.sock` made /tmp itself 0700 for everyone.
    tmp = Path(tempfile.gettempdir())
    before = stat.S_IMODE(tmp.stat().st_mode)
    path = tmp / f"t9-{secrets.token_hex(4)}.sock"
    running = start_thread_daemon(path, [])
    try:
        with Client(path) as client:
            assert client.slot_list() == []
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert stat.S_IMODE(tmp.stat().st_mode) == before
    finally:
        stop_daemon(running)


@needs_root
def test_another_users_leftover_socket_is_not_removed(other_user, shared_tmp):
    path = shared_tmp / "x.sock"
    made = other_user.run(
        "import socket\ns = socket.socket(socket.AF_UNIX); s.bind(args[0]); s.close()", str(path)
    )
    assert made.returncode == 0, made.stderr
    proc = subprocess.run(
        _serve_argv("--socket", str(path)), capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 1 and f"belongs to uid {other_user.uid}" in proc.stderr
    assert path.lstat().st_uid == other_user.uid


def test_directories_are_created_0700_whatever_the_umask() -> None:
    base = Path(tempfile.mkdtemp(prefix="t9-"))
    old = os.umask(0)
    try:
        secure_socket_directory(base / "a" / "b" / "c")
    finally:
        os.umask(old)
    try:
        for d in (base / "a", base / "a" / "b", base / "a" / "b" / "c"):
            assert stat.S_IMODE(d.stat().st_mode) == 0o700, d
    finally:
        shutil.rmtree(base)


# --- 3. connection floods and fd exhaustion ------------------------------------------------


def _memory_daemon(sock_path: Path, limits: Limits) -> RunningDaemon:
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.memory import MemoryReader, MemoryWatcher
    from tokend.simulators.piv import VirtualPivCard

    card = VirtualPivCard()
    demo = provision_demo(card)
    reader = MemoryReader("Memory Reader 0")
    reader.insert(card)
    running = start_thread_daemon(sock_path, [MemoryWatcher(reader)], limits)
    running.extras.update(card=card, demo=demo, slot=wait_for_token(running))
    return running


def _connect(path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(10)
    s.connect(str(path))
    return s


def _lines(s: socket.socket, count: int) -> list[dict]:
    buf = b""
    while buf.count(b"\n") < count:
        chunk = s.recv(1 << 16)
        if not chunk:
            break
        buf += chunk
    return [json.loads(line) for line in buf.splitlines()]


GET_INFO = b'{"jsonrpc":"2.0","id":1,"method":"C_GetInfo"}\n'


@pytest.mark.parametrize(
    "limits", [Limits(max_connections=6), Limits(max_connections_per_uid=6)], ids=["total", "uid"]
)
def test_connections_over_the_cap_get_one_error_and_the_log_stays_quiet(
    sock_path: Path, limits: Limits, caplog
) -> None:
    running = _memory_daemon(sock_path, limits)
    held: list[socket.socket] = []
    try:
        for _ in range(6):
            held.append(_connect(sock_path))
            held[-1].sendall(GET_INFO)
            assert "result" in _lines(held[-1], 1)[0]  # admitted and served
        caplog.clear()
        for _ in range(200):
            with _connect(sock_path) as extra:
                answers = _lines(extra, 2)
                assert [a["error"]["code"] for a in answers] == [-32000]  # then closed
        busy = [r for r in caplog.records if "too many connections" in r.getMessage()]
        assert 1 <= len(busy) <= 2, [r.getMessage() for r in busy]
        held.pop().close()
        deadline = time.monotonic() + 10
        while True:  # a place is free again once the daemon has seen that close
            try:
                with Client(sock_path) as client:
                    assert client.slot_list() == [0]
                break
            except ConnectionError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    finally:
        for s in held:
            s.close()
        stop_daemon(running)


def test_out_of_file_descriptors_backs_off_and_logs_once(sock_path: Path) -> None:
    def low_fd_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    proc = subprocess.Popen(
        _serve_argv("--simulate", "piv", "--socket", str(sock_path)),
        preexec_fn=low_fd_limit,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    held: list[socket.socket] = []
    try:
        _wait_for_socket(proc, sock_path)
        first = _connect(sock_path)
        held.append(first)
        for _ in range(150):  # more than the daemon has descriptors for
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            if s.connect_ex(str(sock_path)) in (0, 11):  # 11: EAGAIN, the backlog is full
                held.append(s)
            else:
                s.close()
        # The exposure window of the original run (asyncio logged ~6,000 tracebacks a
        # second here); meanwhile an admitted client is still served.
        for _ in range(10):
            first.sendall(GET_INFO)
            assert "result" in _lines(first, 1)[0]
            time.sleep(0.2)
        for s in held:
            s.close()
        held.clear()
        deadline = time.monotonic() + 10
        while True:  # the queued connections drain; then a new client gets in
            try:
                with Client(sock_path, timeout=5) as client:
                    assert client.slot_list() == [0]
                break
            except (OSError, ConnectionError):
                assert time.monotonic() < deadline
                time.sleep(0.1)
    finally:
        for s in held:
            s.close()
        out = _stop(proc)
    accept_lines = [line for line in out.splitlines() if "accept" in line]
    assert 1 <= len(accept_lines) <= 3, accept_lines[:5]
    assert len(out) < 20_000, out[-2000:]
    assert "Traceback" not in out


# --- 4. deeply nested JSON -------------------------------------------------------------------


@pytest.mark.parametrize(
    "line",
    [
        b"[" * 5000 + b"]" * 5000,
        b'{"jsonrpc":"2.0","id":1,"method":"C_GetInfo","params":{"x":'
        + b"[" * 5000
        + b"]" * 5000
        + b"}}",
    ],
    ids=["bare", "in-params"],
)
def test_deeply_nested_json_gets_a_parse_error_and_the_next_request_is_answered(
    memory_piv, line: bytes
) -> None:
    with _connect(memory_piv.socket) as s:
        s.sendall(line + b"\n" + b'{"jsonrpc":"2.0","id":2,"method":"C_GetSlotList"}\n')
        first, second = _lines(s, 2)
        assert first["error"]["code"] == -32700
        assert second["id"] == 2 and second["result"]["slot_list"] == [0]


# --- 5. per-connection limits ----------------------------------------------------------------


def _call(s: socket.socket, request_id: int, method: str, params: dict) -> dict:
    s.sendall(
        json.dumps(
            {"jsonrpc": "2.0", "id": request_id, "method": method, "params": params}
        ).encode()
        + b"\n"
    )
    return _lines(s, 1)[0]


def test_sessions_per_connection_are_capped(memory_piv) -> None:
    with Client(memory_piv.socket) as client, Client(memory_piv.socket) as other:
        info = client.token_info(0)
        cap = info["max_session_count"]
        assert cap == 64 and info["max_rw_session_count"] == 64
        for _ in range(cap):
            client.open_session(0)
        with pytest.raises(Exception) as over:
            client.open_session(0)
        assert over.value.ckr == 0xB1  # CKR_SESSION_COUNT
        assert other.open_session(0)  # the cap is per connection


def test_pending_waits_per_connection_are_capped(memory_piv) -> None:
    with _connect(memory_piv.socket) as s:
        burst = b"".join(
            json.dumps(
                {"jsonrpc": "2.0", "id": i, "method": "C_WaitForSlotEvent", "params": {}}
            ).encode()
            + b"\n"
            for i in range(2000)
        )
        last = b'{"jsonrpc":"2.0","id":"last","method":"C_GetInfo"}\n'
        # Sent from a thread: the daemon stops reading while its answers are not read.
        sender = threading.Thread(target=s.sendall, args=(burst + last,), daemon=True)
        sender.start()
        answers = _lines(s, 2000 - 8 + 1)
        sender.join(10)
        refused = [a for a in answers if a.get("error", {}).get("code") == 0x06]
        assert len(refused) == 2000 - 8  # CKR_FUNCTION_FAILED beyond the 8 waiting
        assert answers[-1]["id"] == "last" and "result" in answers[-1]  # in order, served


def _signing_key(client: Client, session: int) -> tuple[int, str]:
    for handle in client.find_objects(
        session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_SIGN: True}
    ):
        attrs = client.get_attributes(
            session, handle, [CKA.CKA_ALWAYS_AUTHENTICATE, CKA.CKA_KEY_TYPE]
        )
        if not attrs["CKA_ALWAYS_AUTHENTICATE"]:
            mech = (
                "CKM_SHA256_RSA_PKCS" if attrs["CKA_KEY_TYPE"] == "CKK_RSA" else "CKM_ECDSA_SHA256"
            )
            return handle, mech
    raise AssertionError("the demo token has no PIN-once signing key")


def test_multi_part_input_is_capped_per_connection(memory_piv) -> None:
    part = base64.b64encode(bytes(700 * 1024)).decode()
    with Client(memory_piv.socket) as client:
        s1 = client.open_session(0)
        client.login(s1, PIN)
        key, mech = _signing_key(client, s1)
        s2 = client.open_session(0)
        for s in (s1, s2):
            client.call("C_SignInit", {"h_session": s, "p_mechanism": mech, "h_key": key})
        client.call("C_SignUpdate", {"h_session": s1, "p_part": part})
        with pytest.raises(Exception) as over:  # the second 700 KiB, in another session
            client.call("C_SignUpdate", {"h_session": s2, "p_part": part})
        assert over.value.ckr == 0x21  # CKR_DATA_LEN_RANGE
        with pytest.raises(Exception) as ended:
            client.call("C_SignFinal", {"h_session": s2})
        assert ended.value.ckr == 0x91  # CKR_OPERATION_NOT_INITIALIZED: the error ended it
        assert client.call("C_SignFinal", {"h_session": s1})["signature"]


def test_session_objects_per_connection_are_capped(memory_piv) -> None:
    from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

    from tests.helpers import ID_9A
    from tokend.protocol import b64

    peer = ec.generate_private_key(ec.SECP256R1()).public_key()
    point = b64(peer.public_bytes(Encoding.X962, PublicFormat.UncompressedPoint))
    mech = {"mechanism": "CKM_ECDH1_DERIVE", "parameter": {"kdf": "CKD_NULL", "public_data": point}}
    with Client(memory_piv.socket) as client:
        session = client.open_session(0)
        client.login(session, PIN)
        key = private_key(client, session, ID_9A)
        derive = {"h_session": session, "p_mechanism": mech, "h_base_key": key, "p_template": {}}
        handles = [client.call("C_DeriveKey", derive)["h_key"] for _ in range(64)]
        with pytest.raises(Exception) as over:  # secrets nobody destroys
            client.call("C_DeriveKey", derive)
        assert over.value.ckr == 0x02  # CKR_HOST_MEMORY
        client.call("C_DestroyObject", {"h_session": session, "h_object": handles[0]})
        assert client.call("C_DeriveKey", derive)["h_key"]


# --- 6. tokenctl input sizes --------------------------------------------------------------


def test_tokenctl_refuses_endless_and_huge_inputs(memory_piv, tmp_path: Path, capsys) -> None:
    huge = tmp_path / "huge.pem"
    with open(huge, "wb") as fh:
        fh.truncate(200 << 20)  # sparse: 200 MB without using the disk
    zero = os.open("/dev/zero", os.O_RDONLY)
    try:
        for argv in (
            ["import-p12", "/dev/zero"],
            ["cert", "import", str(huge), "--slot", "9d"],
            ["decrypt", "--in", "/dev/zero"],
            ["decrypt", "--in", str(tmp_path / "none"), "--pin-fd", str(zero)],
        ):
            if argv[-1] == str(zero):
                (tmp_path / "none").write_bytes(b"x")
            started = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
            rc = tokenctl(["--socket", str(memory_piv.socket), *argv])
            err = capsys.readouterr().err
            assert rc == 2, (argv, err)
            assert "larger than" in err or "no line end" in err, err
            grown_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - started
            assert grown_kb < 50 * 1024, (argv, grown_kb)
    finally:
        os.close(zero)


# --- 7. one wrong PIN from another connection ------------------------------------------------


def test_a_wrong_pin_elsewhere_is_reported_and_then_held_back(memory_piv) -> None:
    demo = memory_piv.extras["demo"]
    blob, secret = pkcs1_blob(demo.encryption_public_key)
    with Client(memory_piv.socket) as mail, Client(memory_piv.socket) as other:
        mail.subscribe()
        s_mail = mail.open_session(0)
        mail.login(s_mail, PIN)
        key = private_key(mail, s_mail, ID_9D)
        assert mail.decrypt(s_mail, key, "CKM_RSA_PKCS", blob) == secret

        s_other = other.open_session(0)
        with pytest.raises(PinIncorrectError) as wrong:
            other.login(s_other, "000000")
        assert wrong.value.retries == 2
        # The mail client hears at once that its login is gone (the card reset it) ...
        lost = mail.next_event(timeout=5)
        assert lost == {
            "notification": "login_lost",
            "slot_id": 0,
            "generation": lost["generation"],
            "serial": demo.guid.hex(),
            "reason": "wrong_pin",
        }
        with pytest.raises(UserNotLoggedInError):
            mail.decrypt(s_mail, key, "CKM_RSA_PKCS", blob)
        # ... the disturber cannot go again right away, not even on a new connection,
        # and the card never sees those tries ...
        for client, session in ((other, s_other), (Client(memory_piv.socket), None)):
            with client:
                session = session or client.open_session(0)
                with pytest.raises(FunctionFailedError) as held:
                    client.login(session, "000000")
                assert 0 < held.value.retry_after <= 1.0
        status = mail.call("tokend_GetTokenStatus", {"slot_id": 0})["status"]
        assert status["pin_retries"] == 2
        # ... while the client that was logged out logs in again at once.
        mail.login(s_mail, PIN)
        assert mail.decrypt(s_mail, key, "CKM_RSA_PKCS", blob) == secret


def test_a_user_mistyping_alone_is_not_held_back(memory_piv) -> None:
    with Client(memory_piv.socket) as client:
        session = client.open_session(0)
        with pytest.raises(PinIncorrectError):
            client.login(session, "000000")
        client.login(session, PIN)


# --- 8. small things ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("C_OpenSession", {"slot_id": 0, "flags": 2**64 + 4}),
        ("C_GetSlotInfo", {"slot_id": 2**64}),
        ("C_CloseSession", {"h_session": 2**64 + 1}),
    ],
)
def test_numbers_beyond_ck_ulong_are_bad_arguments(memory_piv, method: str, params: dict) -> None:
    with _connect(memory_piv.socket) as s:
        answer = _call(s, 1, method, params)
        assert answer["error"]["code"] == 7  # CKR_ARGUMENTS_BAD


def test_pkcs12_without_certificate_says_so(tmp_path: Path, capsys) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    p12 = tmp_path / "key-only.p12"
    p12.write_bytes(
        pkcs12.serialize_key_and_certificates(
            b"k", key, None, None, serialization.BestAvailableEncryption(b"pw")
        )
    )
    read, write = os.pipe()
    os.write(write, b"pw\n")
    os.close(write)
    try:
        rc = tokenctl(
            ["--socket", "/nonexistent", "import-p12", str(p12), "--password-fd", str(read)]
        )
    finally:
        os.close(read)
    err = capsys.readouterr().err
    assert rc == 1 and "holds a private key but no certificate" in err, err


def test_tokenctl_messages_carry_no_ckr_prefix(memory_piv, tmp_path: Path, capsys) -> None:
    from tests.test_provisioning import _self_signed

    other = ec.generate_private_key(ec.SECP256R1())
    cert = tmp_path / "other.pem"
    cert.write_bytes(_self_signed(other, "Other").public_bytes(serialization.Encoding.PEM))
    read, write = os.pipe()
    os.write(write, PIN.encode() + b"\n")
    os.close(write)
    try:
        rc = tokenctl(
            ["--socket", str(memory_piv.socket), "cert", "import", str(cert), "--slot", "9d",
             "--pin-fd", str(read)]
        )  # fmt: skip
    finally:
        os.close(read)
    err = capsys.readouterr().err
    assert rc == 1 and "does not match" in err, err
    assert "CKR_" not in err
