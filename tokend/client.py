"""Python client for the native socket API: `AsyncClient` (asyncio) and `Client` (blocking).

Both raise the daemon's own error classes, rebuilt from the CKR code (`tokend.errors`).
Both check who serves the socket (SO_PEERCRED: our own uid or root) before sending a
byte, and raise `UntrustedServerError` otherwise: a PIN never goes to another user's
socket (tokend.socket_security).
The convenience methods are written once, as *plans* (generators yielding calls), and run
by either client, so the two stay identical.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import socket
from collections.abc import Callable, Generator, Mapping
from pathlib import Path
from typing import Any, TypeVar

from tokend.errors import TokendError
from tokend.model import Mechanism
from tokend.paths import default_socket_path
from tokend.pkcs11 import CKA, CKU
from tokend.protocol import (
    LOGIN_LOST_NOTIFICATION,
    MAX_REQUEST_BYTES,
    SLOT_EVENT_NOTIFICATION,
    b64,
    encode_attribute,
    encode_mechanism,
    encode_request,
    unb64,
)
from tokend.socket_security import UntrustedServerError, check_server, connect_checked

__all__ = ["AsyncClient", "Client", "ProtocolFailure", "UntrustedServerError"]

#: Notifications a client collects (slot events and lost logins).
_NOTIFICATIONS = (SLOT_EVENT_NOTIFICATION, LOGIN_LOST_NOTIFICATION)

T = TypeVar("T")
Plan = Generator[Any, Any, T]  # yields a (method, params) step or a Batch of them


class ProtocolFailure(TokendError):
    """The daemon answered with a JSON-RPC (not PKCS#11) error: a bug in the request."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code


def _raise_for(error: Mapping[str, Any]) -> None:
    code = int(error.get("code", -32603))
    message = str(error.get("message", ""))
    if code < 0:
        raise ProtocolFailure(code, message)
    data = error.get("data") or {}
    raise TokendError.from_ckr(code, message, **(data if isinstance(data, dict) else {}))


def _template(attrs: Mapping[CKA | str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in attrs.items():
        cka = k if isinstance(k, CKA) else CKA[k]
        out[cka.name] = (
            encode_attribute(cka, v) if not isinstance(v, str) or cka == CKA.CKA_LABEL else v
        )
    return out


def _mech(mechanism: Mechanism | str) -> Any:
    return mechanism if isinstance(mechanism, str) else encode_mechanism(mechanism)


def _one_shot(
    session: int, key: int, mechanism: Mechanism | str, context_pin: str | None, op: str
) -> Batch:
    """C_<op>Init, and for a PIN-always key the context-specific login that must come with
    this very operation; the caller appends the operation itself (one round trip in all)."""
    init = {"h_session": session, "p_mechanism": _mech(mechanism), "h_key": key}
    calls = Batch([(f"C_{op}Init", init)])
    if context_pin is not None:
        login = {"h_session": session, "user_type": "CKU_CONTEXT_SPECIFIC", "p_pin": context_pin}
        calls.append(("C_Login", login))
    return calls


class _Plans:
    """The API as plans. Each yields (method, params) and gets the result object back."""

    @staticmethod
    def slot_list(token_present: bool) -> Plan[list[int]]:
        r = yield "C_GetSlotList", {"token_present": token_present}
        return list(r["slot_list"])

    @staticmethod
    def info(method: str, slot_id: int) -> Plan[dict[str, Any]]:
        r = yield method, {"slot_id": slot_id}
        return dict(r["info"])

    @staticmethod
    def open_session(slot_id: int, rw: bool) -> Plan[int]:
        flags = ["CKF_SERIAL_SESSION"] + (["CKF_RW_SESSION"] if rw else [])
        r = yield "C_OpenSession", {"slot_id": slot_id, "flags": flags}
        return int(r["h_session"])

    @staticmethod
    def login(session: int, pin: str | None, user_type: CKU) -> Plan[None]:
        # pin None: the protected authentication path (the daemon's own prompt asks).
        params: dict[str, Any] = {"h_session": session, "user_type": user_type.name}
        if pin is not None:
            params["p_pin"] = pin
        yield "C_Login", params

    @staticmethod
    def find_objects(session: int, template: Mapping[CKA | str, Any]) -> Plan[list[int]]:
        yield "C_FindObjectsInit", {"h_session": session, "p_template": _template(template)}
        try:
            r = yield "C_FindObjects", {"h_session": session, "ul_max_object_count": 1 << 20}
        finally:
            yield "C_FindObjectsFinal", {"h_session": session}
        return list(r["h_object"])

    @staticmethod
    def get_attributes(session: int, obj: int, types: list[CKA | str]) -> Plan[dict[str, Any]]:
        names = [t.name if isinstance(t, CKA) else t for t in types]
        r = yield (
            "C_GetAttributeValue",
            {"h_session": session, "h_object": obj, "p_template": names},
        )
        return dict(r["template"])

    @staticmethod
    def decrypt(
        session: int, key: int, mechanism: Mechanism | str, data: bytes, context_pin: str | None
    ) -> Plan[bytes]:
        calls = _one_shot(session, key, mechanism, context_pin, "Decrypt")
        calls.append(("C_Decrypt", {"h_session": session, "p_encrypted_data": b64(data)}))
        results = yield calls
        return unb64(results[-1]["data"])

    @staticmethod
    def sign(
        session: int, key: int, mechanism: Mechanism | str, data: bytes, context_pin: str | None
    ) -> Plan[bytes]:
        calls = _one_shot(session, key, mechanism, context_pin, "Sign")
        calls.append(("C_Sign", {"h_session": session, "p_data": b64(data)}))
        results = yield calls
        return unb64(results[-1]["signature"])

    @staticmethod
    def derive(session: int, key: int, mechanism: Mechanism) -> Plan[bytes]:
        r = yield (
            "C_DeriveKey",
            {
                "h_session": session,
                "p_mechanism": _mech(mechanism),
                "h_base_key": key,
                "p_template": {},
            },
        )
        handle = r["h_key"]
        r = yield (
            "C_GetAttributeValue",
            {"h_session": session, "h_object": handle, "p_template": ["CKA_VALUE"]},
        )
        yield "C_DestroyObject", {"h_session": session, "h_object": handle}
        return unb64(r["template"]["CKA_VALUE"])


Step = tuple[str, dict[str, Any]]


class Batch(list[Step]):
    """Calls a plan sends together, without waiting between them (one round trip). The
    daemon runs them in order; the plan gets the list of results, or the first error."""


def _steps(step: Step | Batch) -> list[Step]:
    return list(step) if isinstance(step, Batch) else [step]


def _unpack(step: Step | Batch, results: list[dict[str, Any]]) -> Any:
    return results if isinstance(step, Batch) else results[0]


def _run_sync(call_many: Callable[[list[Step]], list[dict[str, Any]]], plan: Plan[T]) -> T:
    try:
        step: Any = next(plan)
        while True:
            try:
                result = _unpack(step, call_many(_steps(step)))
            except Exception as exc:
                step = plan.throw(exc)
            else:
                step = plan.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


async def _run_async(call_many: Callable[[list[Step]], Any], plan: Plan[T]) -> T:
    try:
        step: Any = next(plan)
        while True:
            try:
                result = _unpack(step, await call_many(_steps(step)))
            except Exception as exc:
                step = plan.throw(exc)
            else:
                step = plan.send(result)
    except StopIteration as stop:
        return stop.value  # type: ignore[no-any-return]


def _first_error(answers: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Results in order; raise the first error only after every answer was read, so the
    connection stays in step."""
    for msg in answers:
        if "error" in msg:
            _raise_for(msg["error"])
    return [dict(msg.get("result") or {}) for msg in answers]


def _notification(msg: Mapping[str, Any]) -> dict[str, Any]:
    params = dict(msg.get("params") or {})
    if msg.get("method") == LOGIN_LOST_NOTIFICATION:
        params["notification"] = LOGIN_LOST_NOTIFICATION
    return params


def _socket_path(path: str | Path | None) -> Path:
    return Path(path) if path else default_socket_path()


class Client:
    """Blocking client. ``with Client() as c: c.slot_list()``."""

    def __init__(self, path: str | Path | None = None, *, timeout: float | None = 30.0) -> None:
        self.path = _socket_path(path)
        self._sock: socket.socket = connect_checked(self.path, timeout)
        self._file = self._sock.makefile("rb")
        self._ids = itertools.count(1)
        self.notifications: list[dict[str, Any]] = []

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self._file.close()
            self._sock.close()

    def call(self, method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return self.call_many([(method, dict(params or {}))])[0]

    def call_many(self, steps: list[Step]) -> list[dict[str, Any]]:
        """Send several requests at once and return their results in order."""
        ids = [next(self._ids) for _ in steps]
        self._sock.sendall(
            b"".join(encode_request(i, m, p) for i, (m, p) in zip(ids, steps, strict=True))
        )
        answers: dict[int, dict[str, Any]] = {}
        while len(answers) < len(ids):
            line = self._file.readline(MAX_REQUEST_BYTES * 4)
            if not line:
                raise ConnectionError("tokend closed the connection")
            msg = json.loads(line)
            if "id" not in msg and msg.get("method") in _NOTIFICATIONS:
                self.notifications.append(_notification(msg))
            elif msg.get("id") in ids:
                answers[msg["id"]] = msg
        return _first_error([answers[i] for i in ids])

    def next_event(self, timeout: float = 5.0) -> dict[str, Any]:
        """Wait for the next notification (after `subscribe`): a slot event's params, or a
        lost login's params with ``"notification": "login_lost"`` added."""
        if self.notifications:
            return self.notifications.pop(0)
        old = self._sock.gettimeout()
        self._sock.settimeout(timeout)
        try:
            while True:
                line = self._file.readline(MAX_REQUEST_BYTES * 4)
                if not line:
                    raise ConnectionError("tokend closed the connection")
                msg = json.loads(line)
                if "id" not in msg and msg.get("method") in _NOTIFICATIONS:
                    return _notification(msg)
        finally:
            self._sock.settimeout(old)

    def _plan(self, plan: Plan[T]) -> T:
        return _run_sync(self.call_many, plan)

    def subscribe(self) -> None:
        self.call("subscribe")

    def slot_list(self, token_present: bool = False) -> list[int]:
        return self._plan(_Plans.slot_list(token_present))

    def slot_info(self, slot_id: int) -> dict[str, Any]:
        return self._plan(_Plans.info("C_GetSlotInfo", slot_id))

    def token_info(self, slot_id: int) -> dict[str, Any]:
        return self._plan(_Plans.info("C_GetTokenInfo", slot_id))

    def open_session(self, slot_id: int, rw: bool = False) -> int:
        return self._plan(_Plans.open_session(slot_id, rw))

    def close_session(self, session: int) -> None:
        self.call("C_CloseSession", {"h_session": session})

    def login(self, session: int, pin: str | None, user_type: CKU = CKU.CKU_USER) -> None:
        """C_Login; ``pin=None`` lets the daemon ask the user (protected authentication
        path, when the token's flags include CKF_PROTECTED_AUTHENTICATION_PATH); the call
        then waits for the person at the prompt, without the socket timeout."""
        if pin is not None:
            self._plan(_Plans.login(session, pin, user_type))
            return
        old = self._sock.gettimeout()
        self._sock.settimeout(None)  # the daemon's prompt has its own timeout
        try:
            self._plan(_Plans.login(session, pin, user_type))
        finally:
            self._sock.settimeout(old)

    def logout(self, session: int) -> None:
        self.call("C_Logout", {"h_session": session})

    def find_objects(self, session: int, template: Mapping[CKA | str, Any]) -> list[int]:
        return self._plan(_Plans.find_objects(session, template))

    def get_attributes(self, session: int, obj: int, types: list[CKA | str]) -> dict[str, Any]:
        return self._plan(_Plans.get_attributes(session, obj, types))

    def decrypt(
        self,
        session: int,
        key: int,
        mechanism: Mechanism | str,
        data: bytes,
        context_pin: str | None = None,
    ) -> bytes:
        return self._plan(_Plans.decrypt(session, key, mechanism, data, context_pin))

    def sign(
        self,
        session: int,
        key: int,
        mechanism: Mechanism | str,
        data: bytes,
        context_pin: str | None = None,
    ) -> bytes:
        return self._plan(_Plans.sign(session, key, mechanism, data, context_pin))

    def derive(self, session: int, key: int, mechanism: Mechanism) -> bytes:
        return self._plan(_Plans.derive(session, key, mechanism))

    def wait_for_slot_event(self, dont_block: bool = False) -> int:
        flags = ["CKF_DONT_BLOCK"] if dont_block else []
        return int(self.call("C_WaitForSlotEvent", {"flags": flags})["slot"])


class AsyncClient:
    """asyncio client. ``async with await AsyncClient.connect() as c: …``.

    Requests may be issued concurrently; answers are matched by id.
    """

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._reader = reader
        self._writer = writer
        self._ids = itertools.count(1)
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.notifications: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._pump = asyncio.create_task(self._read_loop())

    @classmethod
    async def connect(cls, path: str | Path | None = None) -> AsyncClient:
        where = _socket_path(path)
        reader, writer = await asyncio.open_unix_connection(str(where), limit=MAX_REQUEST_BYTES * 4)
        try:
            check_server(writer.get_extra_info("socket"), where)
        except BaseException:
            writer.close()
            raise
        return cls(reader, writer)

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        self._pump.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await self._pump
        self._writer.close()
        with contextlib.suppress(Exception):
            await self._writer.wait_closed()

    async def _read_loop(self) -> None:
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                msg = json.loads(line)
                if "id" not in msg and msg.get("method") in _NOTIFICATIONS:
                    self.notifications.put_nowait(_notification(msg))
                    continue
                fut = self._pending.pop(msg.get("id"), None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
        finally:
            for fut in self._pending.values():
                if not fut.done():
                    fut.set_exception(ConnectionError("tokend closed the connection"))

    async def call(self, method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
        return (await self.call_many([(method, dict(params or {}))]))[0]

    async def call_many(self, steps: list[Step]) -> list[dict[str, Any]]:
        """Send several requests at once and return their results in order."""
        loop = asyncio.get_running_loop()
        futures = []
        for method, params in steps:
            request_id = next(self._ids)
            fut: asyncio.Future[dict[str, Any]] = loop.create_future()
            self._pending[request_id] = fut
            futures.append(fut)
            self._writer.write(encode_request(request_id, method, params))
        await self._writer.drain()
        return _first_error(list(await asyncio.gather(*futures)))

    async def _plan(self, plan: Plan[T]) -> T:
        return await _run_async(self.call_many, plan)

    async def subscribe(self) -> None:
        await self.call("subscribe")

    async def next_event(self, timeout: float = 5.0) -> dict[str, Any]:
        return await asyncio.wait_for(self.notifications.get(), timeout)

    async def slot_list(self, token_present: bool = False) -> list[int]:
        return await self._plan(_Plans.slot_list(token_present))

    async def token_info(self, slot_id: int) -> dict[str, Any]:
        return await self._plan(_Plans.info("C_GetTokenInfo", slot_id))

    async def open_session(self, slot_id: int, rw: bool = False) -> int:
        return await self._plan(_Plans.open_session(slot_id, rw))

    async def login(self, session: int, pin: str | None, user_type: CKU = CKU.CKU_USER) -> None:
        await self._plan(_Plans.login(session, pin, user_type))

    async def find_objects(self, session: int, template: Mapping[CKA | str, Any]) -> list[int]:
        return await self._plan(_Plans.find_objects(session, template))

    async def get_attributes(
        self, session: int, obj: int, types: list[CKA | str]
    ) -> dict[str, Any]:
        return await self._plan(_Plans.get_attributes(session, obj, types))

    async def decrypt(
        self,
        session: int,
        key: int,
        mechanism: Mechanism | str,
        data: bytes,
        context_pin: str | None = None,
    ) -> bytes:
        return await self._plan(_Plans.decrypt(session, key, mechanism, data, context_pin))

    async def sign(
        self,
        session: int,
        key: int,
        mechanism: Mechanism | str,
        data: bytes,
        context_pin: str | None = None,
    ) -> bytes:
        return await self._plan(_Plans.sign(session, key, mechanism, data, context_pin))

    async def derive(self, session: int, key: int, mechanism: Mechanism) -> bytes:
        return await self._plan(_Plans.derive(session, key, mechanism))

    async def wait_for_slot_event(self, dont_block: bool = False) -> int:
        flags = ["CKF_DONT_BLOCK"] if dont_block else []
        r = await self.call("C_WaitForSlotEvent", {"flags": flags})
        return int(r["slot"])
