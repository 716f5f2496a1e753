"""The socket itself: permissions, peer checks, one daemon per path, and bad input that
gets a clear error while every other client keeps being served."""

from __future__ import annotations

import json
import os
import socket
import stat
from pathlib import Path

import pytest

from tests.conftest import start_daemon, stop_daemon
from tokend.client import Client
from tokend.daemon import DaemonAlreadyRunning, prepare_socket_path
from tokend.protocol import MAX_REQUEST_BYTES


def raw(sock_path: Path) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5)
    s.connect(str(sock_path))
    return s


def exchange(s: socket.socket, line: bytes) -> dict:
    s.sendall(line)
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    return json.loads(buf)


def test_socket_and_directory_are_private(memory_piv) -> None:
    sock = memory_piv.socket
    assert stat.S_IMODE(sock.stat().st_mode) == 0o600
    assert stat.S_IMODE(sock.parent.stat().st_mode) == 0o700


def test_second_daemon_on_the_same_path_is_refused(memory_piv) -> None:
    with pytest.raises(DaemonAlreadyRunning):
        prepare_socket_path(memory_piv.socket)


def test_stale_socket_is_replaced(sock_path: Path) -> None:
    sock_path.parent.mkdir(mode=0o700, exist_ok=True)
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(str(sock_path))
    stale.close()  # the file stays, nobody listens: a crashed daemon's leftover
    running = start_daemon(sock_path, [])
    try:
        with Client(sock_path) as client:
            assert client.slot_list() == []
    finally:
        stop_daemon(running)
    assert not sock_path.exists()


def _dir_others_can_reach() -> Path:
    """A fresh directory whose every ancestor lets another uid through (search bit for
    others): the temp dir of some machines is 0700, and then nobody else could even reach
    the socket, so the peer check would never be what refused them."""
    import tempfile

    for base in (tempfile.gettempdir(), "/dev/shm", "/var/tmp"):
        path = Path(base).resolve()
        if path.is_dir() and all(p.stat().st_mode & 0o001 for p in (path, *path.parents)):
            made = Path(tempfile.mkdtemp(prefix="tokend-peer-", dir=path))
            made.chmod(0o755)
            return made
    raise AssertionError("no directory another uid can reach; cannot test the peer check")


def test_other_users_are_refused() -> None:
    if os.getuid() != 0:
        pytest.skip("needs root to act as another uid")
    reachable = _dir_others_can_reach()
    sock_path = reachable / "tokend" / "tokend.sock"
    running = start_daemon(sock_path, [])
    try:
        _assert_refuses_nobody(sock_path)
    finally:
        stop_daemon(running)
        reachable.joinpath("tokend").rmdir()
        reachable.rmdir()


def _assert_refuses_nobody(sock_path: Path) -> None:
    os.chmod(sock_path.parent, 0o755)  # let uid 65534 reach the socket file
    os.chmod(sock_path, 0o666)
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: become nobody and try to talk
        os.close(read_fd)
        outcome = b"?"
        try:
            os.setgid(65534)
            os.setuid(65534)
            s = raw(sock_path)
            s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"C_GetSlotList"}\n')
            answer = s.recv(100)
            outcome = b"answered" if answer else b"closed"
        except (ConnectionResetError, BrokenPipeError):
            outcome = b"closed"  # refused before or while we wrote: also a close
        except TimeoutError:
            outcome = b"timeout"  # neither served nor refused: the daemon left us hanging
        except OSError as exc:
            outcome = f"error {exc}".encode()
        finally:
            os.write(write_fd, outcome)
            os._exit(0)
    os.close(write_fd)
    os.waitpid(pid, 0)
    outcome = os.read(read_fd, 200)
    # Refused means closed at once: not answered, and not a 5 s silence either.
    assert outcome == b"closed", outcome
    # ...while the owner is still served.
    with Client(sock_path) as client:
        assert client.slot_list() == []


@pytest.mark.parametrize(
    ("line", "code"),
    [
        (b"{not json\n", -32700),
        (b"[1,2]\n", -32600),
        (b'{"jsonrpc":"1.0","id":1,"method":"C_GetInfo"}\n', -32600),
        (b'{"jsonrpc":"2.0","id":1,"method":"C_Nonsense"}\n', -32601),
        (b'{"jsonrpc":"2.0","id":1,"method":"C_GetSlotInfo","params":[0]}\n', -32602),
        (b'{"jsonrpc":"2.0","id":1,"method":"C_GetSlotInfo","params":{"slot_id":"zero"}}\n', 7),
        (b'{"jsonrpc":"2.0","id":1,"method":"C_GetSlotInfo","params":{}}\n', 7),
        (b'{"jsonrpc":"2.0","id":1,"method":"C_GetSlotInfo","params":{"slot_id":99}}\n', 3),
        (b'{"jsonrpc":"2.0","id":1,"method":"C_CloseSession","params":{"h_session":42}}\n', 0xB3),
        (b'{"jsonrpc":"2.0","id":1,"method":"C_Login","params":{"h_session":1,"p_pin":7}}\n', 7),
    ],
)
def test_bad_requests_get_clear_errors(memory_piv, line: bytes, code: int) -> None:
    with raw(memory_piv.socket) as s:
        answer = exchange(s, line)
        assert answer["error"]["code"] == code
        assert answer["error"]["message"]
        if code > 0:
            assert answer["error"]["message"].startswith("CKR_")
        # The same connection keeps working.
        ok = exchange(s, b'{"jsonrpc":"2.0","id":2,"method":"C_GetSlotList","params":{}}\n')
        assert ok["result"]["slot_list"] == [0]


def test_unknown_names_are_reported_by_kind(memory_piv) -> None:
    with Client(memory_piv.socket) as client:
        session = client.open_session(0)
        with pytest.raises(Exception) as attr:
            client.call(
                "C_FindObjectsInit", {"h_session": session, "p_template": {"CKA_NONSENSE": True}}
            )
        assert attr.value.ckr == 0x12  # CKR_ATTRIBUTE_TYPE_INVALID
        with pytest.raises(Exception) as mech:
            client.call(
                "C_DecryptInit", {"h_session": session, "p_mechanism": "CKM_NONSENSE", "h_key": 1}
            )
        assert mech.value.ckr == 0x70  # CKR_MECHANISM_INVALID
        with pytest.raises(Exception) as obj:
            client.call(
                "C_GetAttributeValue",
                {"h_session": session, "h_object": 999999, "p_template": ["CKA_LABEL"]},
            )
        assert obj.value.ckr == 0x82  # CKR_OBJECT_HANDLE_INVALID


def _answer_then_eof(s: socket.socket) -> list[bytes]:
    data = b""
    while chunk := s.recv(65536):  # a 5 s timeout here fails the test
        data += chunk
    return data.splitlines()


@pytest.mark.parametrize("newline", [False, True], ids=["no newline", "newline at the end"])
def test_oversized_request_closes_only_that_connection(memory_piv, newline: bool) -> None:
    """A request line over the limit gets one -32600 error and the close; without a newline
    the daemon must not wait for one (its buffer would grow with whatever the client sends).
    The client sends just over the limit and then stops, so the daemon has read everything
    it was sent when it closes (a clean close: the error line cannot be lost to a reset)."""
    with Client(memory_piv.socket) as bystander, raw(memory_piv.socket) as s:
        line = b'{"jsonrpc":"2.0","id":1,"method":"C_GetInfo","params":{"x":"'
        line += b"A" * (MAX_REQUEST_BYTES + 1 - len(line))
        s.sendall(line + (b"\n" if newline else b""))
        lines = _answer_then_eof(s)
        assert len(lines) == 1, lines
        error = json.loads(lines[0])["error"]
        assert error["code"] == -32600 and str(MAX_REQUEST_BYTES) in error["message"]
        assert bystander.slot_list() == [0]


def test_client_vanishing_mid_request_does_not_hurt_others(memory_piv) -> None:
    with Client(memory_piv.socket) as bystander:
        s = raw(memory_piv.socket)
        s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"C_GetSlotList","params":')  # no end
        s.close()
        s = raw(memory_piv.socket)
        s.sendall(b'{"jsonrpc":"2.0","id":1,"method":"C_WaitForSlotEvent","params":{}}\n')
        s.close()  # gone while blocked in C_WaitForSlotEvent
        assert bystander.slot_list() == [0]
        assert bystander.call("C_GetInfo")["info"]["manufacturer_id"] == "tokend"
