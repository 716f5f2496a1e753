"""The p11-kit RPC listener: Debian's unmodified ``p11-kit-client.so`` (and every program
that loads it or reaches it through a p11-kit ``remote:`` module) talks to the same session
engine as the native socket, with the same logins and the same disconnect rule.

One connection is one PKCS#11 application (`Application`). Requests are handled as tasks,
so a client whose threads share the socket gets its answers as they finish (each frame
echoes its request's call code and is written whole). Rules from the protocol's traps:

* the connection is closed only on garbage framing or by the client: a token that leaves
  turns into CKR_DEVICE_REMOVED / CKR_SESSION_HANDLE_INVALID answers (0.24.1 clients never
  reconnect, and a closed socket kills programs that do not ignore SIGPIPE);
* unknown or unimplemented calls get CKR_FUNCTION_NOT_SUPPORTED, the connection lives on;
* C_Finalize first answers this application's pending C_WaitForSlotEvent (with
  CKR_CRYPTOKI_NOT_INITIALIZED) and its other calls in flight, then waits briefly: the
  client closes the socket after the Finalize answer and aborts if a thread still waits;
* a size query never runs the card operation (the bound comes from the key), and a result
  that did not fit the caller's buffer is kept for the follow-up call, so the operation
  stays active as PKCS#11 says; kept results are wiped when the session ends;
* only mechanisms the client's generation can carry are advertised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from tokend import __version__
from tokend.daemon import client_info
from tokend.errors import (
    AttributeTypeInvalidError,
    CryptokiNotInitializedError,
    DataLenRangeError,
    FunctionNotSupportedError,
    GeneralError,
    MechanismInvalidError,
    SessionHandleInvalidError,
    TokendError,
    UserTypeInvalidError,
)
from tokend.limits import Limits
from tokend.listener import SocketListener
from tokend.model import AttributeValue, Mechanism
from tokend.p11kit.codec import (
    ARRAY_TYPES,
    HANDSHAKE,
    HEADER_SIZE,
    SIGNATURES,
    Call,
    Generation,
    OutCapacity,
    ParseError,
    Reader,
    WireAttribute,
    Writer,
    carried_mechanisms,
    error_body,
    frame,
    parse_header,
)
from tokend.pkcs11 import (
    BOOL_ATTRIBUTES,
    CK_UNAVAILABLE_INFORMATION,
    CKA,
    CKR,
    CKU,
    TEXT_ATTRIBUTES,
)
from tokend.session import Application, Engine
from tokend.socket_security import PeerCredentials, bind_private_socket

log = logging.getLogger(__name__)

#: Requests of one connection handled at once; further frames wait to be read.
MAX_IN_FLIGHT = 32
#: How long C_Finalize waits for the application's other calls before answering.
FINALIZE_DRAIN_SECONDS = 30.0
#: After answering pending calls, before answering C_Finalize: the client's waiting
#: threads must take their answers before it closes the socket (else it aborts).
FINALIZE_GRACE_SECONDS = 0.1
MAX_RANDOM = 1 << 16

Handler = Callable[["P11KitConnection", Reader, Writer], Awaitable[None]]
HANDLERS: dict[Call, Handler] = {}


def handles(call: Call) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        HANDLERS[call] = fn
        return fn

    return register


_NEVER = object()
_CALL_IDS = frozenset(int(c) for c in Call)  # a template value that matches nothing


@dataclass
class _Kept:
    """A result that did not fit the caller's buffer, kept for the follow-up call."""

    call: Call
    data_in: bytes
    result: bytearray
    #: the token instance (slot, generation) it came from: wiped when that one leaves
    instance: tuple[int, int]

    def wipe(self) -> None:
        self.result[:] = bytes(len(self.result))


class P11KitConnection:
    def __init__(
        self,
        engine: Engine,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        app: Application,
    ) -> None:
        self.engine = engine
        self.reader = reader
        self.writer = writer
        self.app = app
        self.generation = Generation.V0_24
        self.offered = 0
        self._write_lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()
        self._slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        self._kept: dict[int, _Kept] = {}

    # --- transport --------------------------------------------------------------------

    async def send(self, code: int, body: bytes) -> None:
        async with self._write_lock:
            if self.writer.is_closing():
                return
            self.writer.write(frame(code, body))
            with contextlib.suppress(ConnectionError):
                await self.writer.drain()

    async def serve(self) -> None:
        try:
            offered = (await self.reader.readexactly(1))[0]
            # Answer 0 whatever is offered (then no client uses calls 88/89), but remember
            # the offer: newer clients use newer encodings without asking.
            self.offered = offered
            self.generation = Generation.from_offered(offered)
            self.writer.write(b"\0")
            await self.writer.drain()
            while True:
                header = parse_header(await self.reader.readexactly(HEADER_SIZE))
                if header.code == 0:
                    raise ParseError("call code 0")
                await self.reader.readexactly(header.options_length)
                body = bytearray(await self.reader.readexactly(header.body_length))
                await self._slots.acquire()
                task = asyncio.create_task(self._handle(header.code, body))
                self._tasks.add(task)
                task.add_done_callback(self._done)
        except ParseError as exc:
            log.info("p11-kit client %s: %s; closing the connection", self.app.peer, exc)
        except (asyncio.IncompleteReadError, ConnectionError):
            pass  # EOF: the application ended (or finalized)
        finally:
            for task in list(self._tasks):
                task.cancel()
            for task in list(self._tasks):
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._drop_kept()
            await self.engine.close_application(self.app)
            with contextlib.suppress(Exception):
                self.writer.close()
                await self.writer.wait_closed()

    def _done(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        self._slots.release()

    async def _handle(self, code: int, body: bytearray) -> None:
        call: int | str = "?"
        try:
            try:
                reader = Reader(body, self.generation)
                call = reader.call
                known = reader.call in _CALL_IDS
                handler = HANDLERS.get(Call(reader.call)) if known else None
                if handler is None:
                    raise FunctionNotSupportedError(f"call {reader.call} is not implemented")
                request_sig, response_sig = SIGNATURES[Call(reader.call)]
                reader.expect(request_sig)
                writer = Writer(reader.call, response_sig)
                await handler(self, reader, writer)
                response = writer.done()
            finally:
                body[:] = bytes(len(body))  # it may have held a PIN
        except ParseError as exc:
            log.info("p11-kit client %s: call %s: %s", self.app.peer, call, exc)
            response = error_body(CKR.CKR_DEVICE_ERROR)
        except TokendError as exc:
            # Messages never carry secrets; log the code and the call only.
            log.debug("p11-kit client %s: call %s -> %s", self.app.peer, call, exc.ckr_name)
            response = error_body(int(exc.ckr))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("p11-kit client %s: internal error in call %s", self.app.peer, call)
            response = error_body(CKR.CKR_GENERAL_ERROR)
        await self.send(code, response)

    # --- kept results -------------------------------------------------------------------

    def _drop_kept(self, handle: int | None = None) -> None:
        handles_ = list(self._kept) if handle is None else [handle]
        for h in handles_:
            kept = self._kept.pop(h, None)
            if kept is not None:
                kept.wipe()

    def drop_kept_of(self, instance: tuple[int, int]) -> None:
        """The token left: results it produced are wiped now, not at the next call."""
        for h in [h for h, k in self._kept.items() if k.instance == instance]:
            self._drop_kept(h)

    def _drop_kept_of_closed_sessions(self) -> None:
        for h in [h for h in self._kept if h not in self.app.sessions]:
            self._drop_kept(h)

    async def _output(
        self,
        call: Call,
        handle: int,
        data_in: bytes,
        capacity: OutCapacity,
        writer: Writer,
        run: Callable[[], Awaitable[bytes]],
    ) -> None:
        """The ``ay``/``fy`` convention for C_Sign, C_Decrypt, C_SignFinal."""
        kept = self._kept.get(handle)
        if kept is not None and kept.call is call and kept.data_in == data_in:
            # The session must still be live: a result from before the token left is
            # never handed out (DEVICE_REMOVED here).
            try:
                self.engine.session_info(self.app, handle)
            except TokendError:
                self._drop_kept(handle)
                raise
            if capacity.fits(len(kept.result)):
                writer.out_bytes(bytes(kept.result), capacity)
                self._drop_kept(handle)
            else:
                writer.out_bytes(bytes(len(kept.result)), capacity)
            return
        self._drop_kept(handle)
        if capacity.null:
            bound = self.engine.output_size(self.app, handle)
            if bound is not None:
                writer.out_bytes(bytes(bound), capacity)  # length only; no card operation
                return
        result = bytearray(await run())
        if capacity.fits(len(result)):
            writer.out_bytes(bytes(result), capacity)
            result[:] = bytes(len(result))
        else:
            session = self.app.sessions.get(handle)
            if session is None or session.instance.retired:  # closed or gone meanwhile
                result[:] = bytes(len(result))
                self.engine.session_info(self.app, handle)  # raises the right CKR
                raise SessionHandleInvalidError(f"no session {handle}")
            self._kept[handle] = _Kept(call, data_in, result, session.instance.key)
            writer.out_bytes(bytes(len(result)), capacity)

    # --- conversions ------------------------------------------------------------------

    def template(self, attrs: tuple[WireAttribute, ...]) -> dict[CKA, AttributeValue]:
        """Wire values to the engine's (text attributes as str); compared by value."""
        out: dict[int, object] = {}
        for attr in attrs:
            value: object = attr.value
            if value is None or isinstance(value, tuple):
                value = _NEVER
            elif attr.type in TEXT_ATTRIBUTES and isinstance(value, bytes):
                try:
                    value = value.decode("utf-8")
                except UnicodeDecodeError:
                    value = _NEVER
            elif attr.type in BOOL_ATTRIBUTES and isinstance(value, bytes) and len(value) == 1:
                value = bool(value[0])  # a CK_BBOOL p11-kit's table does not know (raw)
            out[attr.type] = value
        return out  # type: ignore[return-value]

    def mechanism(self, mech: Mechanism | None) -> Mechanism:
        if mech is None:
            raise MechanismInvalidError("NULL mechanism")
        if mech.mechanism not in carried_mechanisms(self.generation):
            raise MechanismInvalidError(f"{mech.mechanism.name} is not carried by this client")
        return mech


# --- general ------------------------------------------------------------------------------


@handles(Call.C_Initialize)
async def _initialize(c: P11KitConnection, r: Reader, w: Writer) -> None:
    handshake = r.byte_array()
    r.byte()  # pReserved given
    reserved = r.byte_array()  # NSS's module parameter string ("profile=…"); not needed
    r.finish()
    if handshake != HANDSHAKE:
        raise GeneralError("unknown RPC handshake")
    log.debug(
        "p11-kit client %s: initialized (offered version %d, reserved %d bytes)",
        c.app.peer,
        c.offered,
        len(reserved or b""),
    )


@handles(Call.C_Finalize)
async def _finalize(c: P11KitConnection, r: Reader, w: Writer) -> None:
    r.finish()
    # Pending waits answer CKR_CRYPTOKI_NOT_INITIALIZED, other calls finish; only then may
    # the Finalize answer let the client close the socket under its waiting threads.
    c.app.cancel_waits()
    others = [t for t in c._tasks if t is not asyncio.current_task()]
    if others:
        await asyncio.wait(others, timeout=FINALIZE_DRAIN_SECONDS)
        await asyncio.sleep(FINALIZE_GRACE_SECONDS)
    await c.engine.finalize(c.app)
    c._drop_kept()


@handles(Call.C_GetInfo)
async def _get_info(c: P11KitConnection, r: Reader, w: Writer) -> None:
    r.finish()
    major, minor = (int(x) for x in __version__.split(".")[:2])
    w.version(2, 40).space_string("tokend", 32).ulong(0)
    w.space_string("tokend p11-kit front end", 32).version(major, minor)


@handles(Call.C_GetSlotList)
async def _get_slot_list(c: P11KitConnection, r: Reader, w: Writer) -> None:
    present, capacity = r.byte(), r.ulong_capacity()
    r.finish()
    w.ulong_array(c.engine.slot_list(bool(present)), capacity)


@handles(Call.C_GetSlotInfo)
async def _get_slot_info(c: P11KitConnection, r: Reader, w: Writer) -> None:
    slot_id = r.ulong()
    r.finish()
    info = c.engine.slot_info(slot_id)
    w.space_string(info.description, 64).space_string(info.manufacturer_id, 32)
    w.ulong(int(info.flags)).version(1, 0).version(1, 0)


@handles(Call.C_GetTokenInfo)
async def _get_token_info(c: P11KitConnection, r: Reader, w: Writer) -> None:
    slot_id = r.ulong()
    r.finish()
    state = c.engine.token_state(slot_id)
    info = state.info
    w.space_string(info.label, 32).space_string(info.manufacturer_id, 32)
    w.space_string(info.model, 16).space_string(info.serial_number, 16)
    w.ulong(int(state.flags))
    w.ulong(state.max_session_count).ulong(state.session_count)
    w.ulong(state.max_session_count).ulong(state.rw_session_count)
    w.ulong(info.max_pin_len).ulong(info.min_pin_len)
    for _ in range(4):  # public/private memory: not known
        w.ulong(CK_UNAVAILABLE_INFORMATION)
    w.version(*info.hardware_version).version(*info.firmware_version)
    w.space_string("", 16)  # no clock on the token


@handles(Call.C_GetMechanismList)
async def _get_mechanism_list(c: P11KitConnection, r: Reader, w: Writer) -> None:
    slot_id, capacity = r.ulong(), r.ulong_capacity()
    r.finish()
    carried = carried_mechanisms(c.generation)
    mechs = [int(m.mechanism) for m in c.engine.mechanisms(slot_id) if m.mechanism in carried]
    w.ulong_array(mechs, capacity)


@handles(Call.C_GetMechanismInfo)
async def _get_mechanism_info(c: P11KitConnection, r: Reader, w: Writer) -> None:
    slot_id, mech_type = r.ulong(), r.ulong()
    r.finish()
    c.engine.registry.instance(slot_id)  # CKR_TOKEN_NOT_PRESENT first
    carried = {int(m): m for m in carried_mechanisms(c.generation)}
    if mech_type not in carried:
        raise MechanismInvalidError(f"mechanism 0x{mech_type:x} is not offered")
    info = c.engine.mechanism_info(slot_id, carried[mech_type])
    w.ulong(info.min_key_size).ulong(info.max_key_size).ulong(int(info.flags))


# --- sessions -----------------------------------------------------------------------------


@handles(Call.C_OpenSession)
async def _open_session(c: P11KitConnection, r: Reader, w: Writer) -> None:
    slot_id, flags = r.ulong(), r.ulong()
    r.finish()
    w.ulong(c.engine.open_session(c.app, slot_id, flags))


@handles(Call.C_CloseSession)
async def _close_session(c: P11KitConnection, r: Reader, w: Writer) -> None:
    handle = r.ulong()
    r.finish()
    c._drop_kept(handle)
    await c.engine.close_session(c.app, handle)


@handles(Call.C_CloseAllSessions)
async def _close_all_sessions(c: P11KitConnection, r: Reader, w: Writer) -> None:
    slot_id = r.ulong()
    r.finish()
    try:
        await c.engine.close_all_sessions(c.app, slot_id)
    finally:
        c._drop_kept_of_closed_sessions()


@handles(Call.C_GetSessionInfo)
async def _get_session_info(c: P11KitConnection, r: Reader, w: Writer) -> None:
    handle = r.ulong()
    r.finish()
    info = c.engine.session_info(c.app, handle)  # never touches the card
    w.ulong(info["slot_id"]).ulong(info["state"]).ulong(info["flags"]).ulong(0)  # type: ignore[arg-type]


@handles(Call.C_Login)
async def _login(c: P11KitConnection, r: Reader, w: Writer) -> None:
    handle, user = r.ulong(), r.ulong()
    pin = r.secret()
    try:
        r.finish()
        try:
            user_type = CKU(user)
        except ValueError:
            raise UserTypeInvalidError(f"user type {user}") from None
        # A NULL PIN (0.24: `00` + length; later `01 FFFFFFFF`) is the protected
        # authentication path: the daemon's own prompt asks, if configured.
        await c.engine.login(c.app, handle, user_type, pin)  # wipes it
    finally:
        if pin is not None:
            pin[:] = bytes(len(pin))


@handles(Call.C_Logout)
async def _logout(c: P11KitConnection, r: Reader, w: Writer) -> None:
    handle = r.ulong()
    r.finish()
    await c.engine.logout(c.app, handle)


# --- objects ------------------------------------------------------------------------------


@handles(Call.C_FindObjectsInit)
async def _find_objects_init(c: P11KitConnection, r: Reader, w: Writer) -> None:
    handle = r.ulong()
    template = r.attributes()
    r.finish()
    c.engine.find_objects_init(c.app, handle, c.template(template))


@handles(Call.C_FindObjects)
async def _find_objects(c: P11KitConnection, r: Reader, w: Writer) -> None:
    handle, capacity = r.ulong(), r.ulong_capacity()
    r.finish()
    # Always "data follows" (at most capacity handles; none = done), never a size answer.
    w.ulong_array(c.engine.find_objects(c.app, handle, capacity), None)


@handles(Call.C_FindObjectsFinal)
async def _find_objects_final(c: P11KitConnection, r: Reader, w: Writer) -> None:
    handle = r.ulong()
    r.finish()
    c.engine.find_objects_final(c.app, handle)


@handles(Call.C_GetAttributeValue)
async def _get_attribute_value(c: P11KitConnection, r: Reader, w: Writer) -> None:
    handle, obj = r.ulong(), r.ulong()
    requested = r.requested_attributes()
    r.finish()
    templates = ARRAY_TYPES[c.generation]
    if c.generation is Generation.V0_24 and any(q.type in templates for q in requested):
        # 0.24.1 rejects any template-typed entry in an answer, even an empty one.
        raise AttributeTypeInvalidError("template attributes are not served")
    types = [q.type for q in requested if q.type not in templates]
    values = c.engine.get_attributes(c.app, handle, obj, types)  # type: ignore[arg-type]
    rv = w.attribute_values(requested, {int(k): v for k, v in values.items()}, c.generation)
    w.ulong(rv)


@handles(Call.C_DestroyObject)
async def _destroy_object(c: P11KitConnection, r: Reader, w: Writer) -> None:
    handle, obj = r.ulong(), r.ulong()
    r.finish()
    c.engine.destroy_object(c.app, handle, obj)


# --- crypto -------------------------------------------------------------------------------


@handles(Call.C_DecryptInit)
async def _decrypt_init(c: P11KitConnection, r: Reader, w: Writer) -> None:
    handle, mech, key = r.ulong(), r.mechanism(), r.ulong()
    r.finish()
    c._drop_kept(handle)
    if mech is None:  # 0.25.3+: a NULL mechanism cancels
        c.engine.cancel_operation(c.app, handle)
        return
    c.engine.decrypt_init(c.app, handle, c.mechanism(mech), key)


@handles(Call.C_Decrypt)
async def _decrypt(c: P11KitConnection, r: Reader, w: Writer) -> None:
    handle, data, capacity = r.ulong(), r.byte_array() or b"", r.out_capacity()
    r.finish()
    await c._output(
        Call.C_Decrypt,
        handle,
        data,
        capacity,
        w,
        lambda: c.engine.decrypt(c.app, handle, data),
    )


@handles(Call.C_SignInit)
async def _sign_init(c: P11KitConnection, r: Reader, w: Writer) -> None:
    handle, mech, key = r.ulong(), r.mechanism(), r.ulong()
    r.finish()
    c._drop_kept(handle)
    if mech is None:
        c.engine.cancel_operation(c.app, handle)
        return
    c.engine.sign_init(c.app, handle, c.mechanism(mech), key)


@handles(Call.C_Sign)
async def _sign(c: P11KitConnection, r: Reader, w: Writer) -> None:
    handle, data, capacity = r.ulong(), r.byte_array() or b"", r.out_capacity()
    r.finish()
    await c._output(
        Call.C_Sign, handle, data, capacity, w, lambda: c.engine.sign(c.app, handle, data)
    )


@handles(Call.C_SignUpdate)
async def _sign_update(c: P11KitConnection, r: Reader, w: Writer) -> None:
    handle, data = r.ulong(), r.byte_array() or b""
    r.finish()
    c.engine.sign_update(c.app, handle, data)


@handles(Call.C_SignFinal)
async def _sign_final(c: P11KitConnection, r: Reader, w: Writer) -> None:
    handle, capacity = r.ulong(), r.out_capacity()
    r.finish()
    await c._output(
        Call.C_SignFinal, handle, b"", capacity, w, lambda: c.engine.sign_final(c.app, handle)
    )


@handles(Call.C_DeriveKey)
async def _derive_key(c: P11KitConnection, r: Reader, w: Writer) -> None:
    # Only clients >= 0.25.0 can send ECDH1_DERIVE; 0.24.1 refuses it on its own side.
    handle, mech, base = r.ulong(), r.mechanism(), r.ulong()
    template = r.attributes()
    r.finish()
    obj = await c.engine.derive_key(c.app, handle, c.mechanism(mech), base, c.template(template))
    w.ulong(obj)


@handles(Call.C_GenerateRandom)
async def _generate_random(c: P11KitConnection, r: Reader, w: Writer) -> None:
    handle, capacity = r.ulong(), r.out_capacity()
    r.finish()
    c.engine.session_info(c.app, handle)  # a live session, as for every session call
    if capacity.length > MAX_RANDOM:
        raise DataLenRangeError(f"at most {MAX_RANDOM} random bytes per call")
    # The host's CSPRNG: random bytes need no token (pkcs11-tool --test asks for them).
    w.out_bytes(secrets.token_bytes(capacity.length), OutCapacity(False, capacity.length))


# --- events -------------------------------------------------------------------------------


@handles(Call.C_WaitForSlotEvent)
async def _wait_for_slot_event(c: P11KitConnection, r: Reader, w: Writer) -> None:
    flags = r.ulong()
    r.finish()
    # The engine caps blocked waits per application (limits.max_pending_waits, below
    # MAX_IN_FLIGHT): CKR_FUNCTION_FAILED beyond, as on the native socket.
    dont_block = bool(flags & 1)
    try:
        slot = await c.engine.wait_for_slot_event(c.app, dont_block)
    except asyncio.CancelledError:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            raise  # the connection is closing
        # C_Finalize from another thread of the client: "finalized, no event".
        raise CryptokiNotInitializedError("C_Finalize was called") from None
    w.ulong(slot)


# --- the listener -------------------------------------------------------------------------


class P11KitServer(SocketListener):
    """``pkcs11.sock`` beside the native socket, made and checked by the same shared code
    (`tokend.socket_security`: directory chain, 0600 from the start, `is_trusted_uid` peers)
    and capped like it (`Engine.limits`: connections in total and per uid)."""

    def __init__(
        self, engine: Engine, path: Path, *, listen_socket: socket.socket | None = None
    ) -> None:
        super().__init__()
        self.engine = engine
        self.path = path
        #: Handed over by systemd (socket activation, fd name "pkcs11"): the socket unit
        #: owns its path, mode and directory, so it is neither created nor removed here.
        self.listen_socket = listen_socket
        self._live: set[P11KitConnection] = set()
        self._logged: dict[str, float] = {}
        engine.registry.on_retire(self._on_retire)

    def _on_retire(self, instance) -> None:  # type: ignore[no-untyped-def]
        for conn in self._live:
            conn.drop_kept_of(instance.key)

    def _log_limited(self, key: str, level: int, message: str, *args: object) -> None:
        """At most one line per kind per 10 s: a flood of refused peers fills no log."""
        now = time.monotonic()
        if now - self._logged.get(key, -1e9) >= 10.0:
            self._logged[key] = now
            log.log(level, message, *args)

    async def start(self) -> None:
        if self.listen_socket is not None:
            name = self.listen_socket.getsockname()
            if name:
                self.path = Path(name)
            self.listen_socket.setblocking(False)
            listener = self.listen_socket
            how = " (socket activation)"
        else:
            listener = bind_private_socket(self.path)
            how = ""
        self._start_accepting(listener)
        log.info("p11-kit RPC listening on %s%s", self.path, how)

    # -- SocketListener -------------------------------------------------------------------

    def _limits(self) -> Limits:
        return self.engine.limits

    def _accept_failed(self, exc: OSError) -> None:
        self._log_limited("accept", logging.ERROR, "p11-kit: cannot accept: %s; retrying", exc)

    def _refused(self, creds: PeerCredentials) -> None:
        self._log_limited(
            "refused", logging.WARNING, "p11-kit: refused pid %d uid %d", creds.pid, creds.uid
        )

    def _busy(self, conn: socket.socket, creds: PeerCredentials) -> None:
        # Closed before the version byte: the client shows "no connection", no slots.
        self._log_limited(
            "busy",
            logging.WARNING,
            "p11-kit: too many connections, refusing pid %d",
            creds.pid,
        )

    async def _serve(self, conn: socket.socket, creds: PeerCredentials) -> None:
        try:
            try:
                reader, writer = await asyncio.open_unix_connection(sock=conn)
            except OSError:
                conn.close()
                return
            app = self.engine.open_application(
                peer=f"p11-kit pid {creds.pid}", client=client_info(creds.pid, creds.uid)
            )
            connection = P11KitConnection(self.engine, reader, writer, app)
            self._live.add(connection)
            try:
                await connection.serve()
            except asyncio.CancelledError:
                pass  # stopping
            finally:
                self._live.discard(connection)
        finally:
            self._release(creds.uid)

    async def stop(self) -> None:
        await self._stop_accepting()
        if self.listen_socket is None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
