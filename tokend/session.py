"""PKCS#11 sessions, per-application logins and the disconnect rule (design brief §5).

This is the one place the disconnect rule lives:

* `SlotRegistry.retire` is the only way a token instance ends; it calls `_on_retire` here,
  which (synchronously, before any other call can run) marks every session on that instance
  removed, drops its operation (wiping a kept context PIN), destroys its session objects
  (zeroing derived secrets) and forgets every login on the instance.
* Every session call goes through `_session()`, which reports a removed session once as
  CKR_DEVICE_REMOVED and then forgets it (CKR_SESSION_HANDLE_INVALID).
* Every card call goes through `TokenInstance.run`, which drops results that arrive after
  the instance was retired and turns a transport failure into a retirement.
* Logins are keyed by (slot, generation): a new insertion never matches an old login.
* Before a private-key operation the application's own login is checked here; the card's
  global verified state is never trusted (CVE-2023-40660 class).

Also here: the per-application limits (tokend.limits) and the wrong-PIN rules — a wrong
PIN resets the card's verified state for everyone, so every application's login on that
token ends at once and logged-in subscribers are told (`LoginLost`); further logins on
the token are refused for a back-off period (docs/threat-model.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

from asn1crypto.keys import ECDomainParameters

from tokend.consent import (
    Authorizer,
    ClientInfo,
    PinPrompter,
    PinRequest,
    TokenDescription,
    Use,
    UseRequest,
)
from tokend.errors import (
    ArgumentsBadError,
    CardNotVerifiedError,
    CardResetError,
    DataLenRangeError,
    DeviceRemovedError,
    FunctionFailedError,
    HostMemoryError,
    KeyFunctionNotPermittedError,
    KeyHandleInvalidError,
    KeyTypeInconsistentError,
    LoginBackoffError,
    MechanismInvalidError,
    NoEventError,
    ObjectHandleInvalidError,
    OperationActiveError,
    OperationNotInitializedError,
    PinIncorrectError,
    PinLockedError,
    SessionCountError,
    SessionHandleInvalidError,
    SessionParallelNotSupportedError,
    UserAlreadyLoggedInError,
    UserNotLoggedInError,
    UserTypeInvalidError,
)
from tokend.limits import DEFAULT_LIMITS, Limits
from tokend.mechanisms.tables import DECRYPT_MECHANISMS, DERIVE_MECHANISMS
from tokend.model import (
    AttributeValue,
    Mechanism,
    MechanismInfo,
    ObjectKey,
    TokenInfo,
    TokenObject,
)
from tokend.pkcs11 import CKA, CKF, CKF_MECH, CKF_SESSION, CKF_TOKEN, CKK, CKM, CKO, CKS, CKU
from tokend.registry import SlotEvent, SlotRegistry, TokenInstance
from tokend.wipe import wipe

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LoginLost:
    """Sent to a subscribed application whose login on a token ended without its asking:
    ``reason`` is "wrong_pin" (another application entered a wrong PIN: the card reset
    its verified state) or "card_reset" (another program reset or re-verified the card)."""

    slot_id: int
    generation: int
    serial: str | None
    reason: str


@dataclass
class _PinFailures:
    """Wrong PINs on one token instance that logged *other* applications out."""

    count: int
    until: float
    #: applications that lost their login to these wrong PINs: never held back
    victims: set[int] = field(default_factory=set)


@dataclass(frozen=True, slots=True)
class SlotInfo:
    description: str
    manufacturer_id: str
    flags: CKF


@dataclass(frozen=True, slots=True)
class TokenState:
    """C_GetTokenInfo as every front end answers it."""

    info: TokenInfo
    flags: CKF_TOKEN
    session_count: int
    rw_session_count: int
    generation: int
    serial: str
    #: per application, PKCS#11's meaning: the daemon's per-connection session limit
    max_session_count: int


class OpKind(Enum):
    DECRYPT = "decrypt"
    SIGN = "sign"


@dataclass
class Operation:
    kind: OpKind
    mechanism: Mechanism
    key: TokenObject
    #: the handle the operation was started with; provisioning may forget it (key replaced)
    key_handle: int
    always_authenticate: bool
    context_pin: bytearray | None = None
    buffer: bytearray = field(default_factory=bytearray)

    def forget_context_pin(self) -> None:
        if self.context_pin is not None:
            wipe(self.context_pin)
            self.context_pin = None

    def wipe(self) -> None:
        self.forget_context_pin()
        wipe(self.buffer)


@dataclass
class SessionObject:
    """An object created in a session (a derived ECDH secret). Lives until the session
    closes, the caller destroys it, or the token leaves; its value is zeroed then."""

    handle: int
    session: int
    attributes: dict[CKA, AttributeValue]
    secret: bytearray

    def wipe(self) -> None:
        wipe(self.secret)


@dataclass
class Session:
    handle: int
    app: Application
    instance: TokenInstance
    rw: bool
    removed: bool = False
    find_results: list[int] | None = None
    operation: Operation | None = None
    objects: dict[int, SessionObject] = field(default_factory=dict)

    @property
    def slot_id(self) -> int:
        return self.instance.slot_id


class Application:
    """One client connection = one PKCS#11 application (§4.1)."""

    _ids = itertools.count(1)

    def __init__(self, engine: Engine, peer: str = "", client: ClientInfo | None = None) -> None:
        self.id = next(self._ids)
        self.engine = engine
        self.peer = peer
        #: the program behind the connection (for prompts and the per-program policy)
        self.client = client or ClientInfo()
        self.sessions: dict[int, Session] = {}
        #: token instances this application is logged in to, keyed (slot, generation)
        self.logins: set[tuple[int, int]] = set()
        self.pending_events: list[int] = []
        self._event_waiters: list[asyncio.Future[int]] = []
        #: Slot events for the connection's notifier; None is only ever put by unsubscribe,
        #: to wake a notifier parked on a queue that is no longer this application's.
        self.notify: asyncio.Queue[SlotEvent | LoginLost | None] | None = None
        #: Handles of private token objects this application was shown (found while
        #: logged in): only these may answer "not logged in"; any other private handle
        #: answers as if it did not exist (it may be another application's).
        self.known_private: set[int] = set()
        #: Set while subscribed, so the connection's notifier sleeps until then.
        self.subscribed = asyncio.Event()
        self.closed = False

    def queue_event(self, event: SlotEvent) -> None:
        while self._event_waiters:
            waiter = self._event_waiters.pop(0)
            if not waiter.done():
                waiter.set_result(event.slot_id)
                break
        else:
            if event.slot_id not in self.pending_events:
                self.pending_events.append(event.slot_id)
        self.post(event)

    def post(self, event: SlotEvent | LoginLost) -> None:
        """Queue a notification for a subscriber; a subscriber that stops reading loses
        the newest beyond the queue's bound rather than growing the daemon."""
        if self.notify is not None:
            with contextlib.suppress(asyncio.QueueFull):
                self.notify.put_nowait(event)

    async def wait_for_slot_event(self, dont_block: bool) -> int:
        if self.pending_events:
            return self.pending_events.pop(0)
        if dont_block:
            raise NoEventError("no slot event")
        limit = self.engine.limits.max_pending_waits
        if len(self._event_waiters) >= limit:
            raise FunctionFailedError(
                f"{limit} C_WaitForSlotEvent calls are already waiting on this connection"
            )
        waiter: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._event_waiters.append(waiter)
        try:
            return await waiter
        finally:
            with contextlib.suppress(ValueError):
                self._event_waiters.remove(waiter)

    def cancel_waits(self) -> None:
        for waiter in self._event_waiters:
            if not waiter.done():
                waiter.cancel()


class Engine:
    """The session engine shared by every front end (native socket, p11-kit RPC)."""

    def __init__(
        self,
        registry: SlotRegistry,
        *,
        pin_prompter: PinPrompter | None = None,
        authorizer: Authorizer | None = None,
        pin_prompts: int = 3,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.registry = registry
        self.limits = limits
        #: Set: tokens advertise CKF_PROTECTED_AUTHENTICATION_PATH and C_Login without a
        #: PIN asks the user through this prompt (the daemon's own, never the client).
        self.pin_prompter = pin_prompter
        #: Asked before every private-key use and provisioning call (per-program policy).
        self.authorizer = authorizer
        self.pin_prompts = pin_prompts
        self.apps: dict[int, Application] = {}
        self._session_ids = itertools.count(1)
        self._object_ids = itertools.count(1)
        self._sessions: dict[int, Session] = {}
        #: token object handles: handle -> (instance key, object key) and back
        self._token_objects: dict[int, tuple[tuple[int, int], ObjectKey]] = {}
        self._token_handles: dict[tuple[tuple[int, int], ObjectKey], int] = {}
        self._session_objects: dict[int, SessionObject] = {}
        #: Serialises VERIFY (login) and the last-logout card reset per token instance, so
        #: a reset can never land after another application's VERIFY it did not see.
        self._login_locks: dict[tuple[int, int], asyncio.Lock] = {}
        #: Wrong-PIN back-off per token instance (docs/threat-model.md).
        self._pin_failures: dict[tuple[int, int], _PinFailures] = {}
        #: per token instance: each mechanism's CKF_MECH flags (what it may be used for)
        self._mechanism_flags: dict[tuple[int, int], dict[CKM, CKF_MECH]] = {}
        registry.on_retire(self._on_retire)
        registry.subscribe(self._on_slot_event)

    # --- applications ------------------------------------------------------------------

    def open_application(self, peer: str = "", client: ClientInfo | None = None) -> Application:
        app = Application(self, peer, client)
        self.apps[app.id] = app
        return app

    async def close_application(self, app: Application) -> None:
        """EOF on a client: its sessions and logins end (§4.1, §5.5)."""
        if app.closed:
            return
        app.closed = True
        app.cancel_waits()
        for handle in list(app.sessions):
            self._drop_session(app.sessions[handle])
        for key in list(app.logins):
            await self._release_login(app, key)
        self.apps.pop(app.id, None)

    # --- disconnect rule -----------------------------------------------------------------

    def _on_retire(self, instance: TokenInstance) -> None:
        key = instance.key
        for session in list(self._sessions.values()):
            if session.instance is instance:
                session.removed = True
                if session.operation is not None:
                    session.operation.wipe()
                    session.operation = None
                session.find_results = None
                for obj in session.objects.values():
                    obj.wipe()
                    self._session_objects.pop(obj.handle, None)
                session.objects.clear()
        for app in self.apps.values():
            app.logins.discard(key)
        self._login_locks.pop(key, None)
        self._pin_failures.pop(key, None)
        self._mechanism_flags.pop(key, None)
        gone: set[int] = set()
        for handle, (inst_key, obj_key) in list(self._token_objects.items()):
            if inst_key == key:
                del self._token_objects[handle]
                self._token_handles.pop((inst_key, obj_key), None)
                gone.add(handle)
        for app in self.apps.values():
            # Handles are never reused, so a long-lived connection would otherwise keep
            # every private handle of every insertion it ever saw (found by the soak).
            app.known_private -= gone

    def _on_slot_event(self, event: SlotEvent) -> None:
        for app in list(self.apps.values()):
            app.queue_event(event)

    def _lost_card_login(self, instance: TokenInstance, reason: str = "card_reset") -> None:
        """The card forgot its verified state (reset by another program, or a wrong PIN):
        every application's login on this instance is reported lost, never silently
        restored; logged-in subscribers are told at once."""
        lost = LoginLost(
            instance.slot_id, instance.generation, instance.token.identity.serial, reason
        )
        for app in self.apps.values():
            if instance.key in app.logins:
                app.logins.discard(instance.key)
                app.post(lost)
            self._forget_context_pins(app, instance)

    def _check_backoff(self, app: Application, instance: TokenInstance) -> None:
        failures = self._pin_failures.get(instance.key)
        if failures is None or app.id in failures.victims:
            return  # those who were logged out may log in again at once
        left = failures.until - time.monotonic()
        if left > 0:
            raise LoginBackoffError(retry_after=left)

    def _wrong_pin(self, app: Application, instance: TokenInstance) -> None:
        """A wrong PIN reached the card: it reset its verified state for everyone (PIV:
        the security status of the PIN is cleared), so every login on it ends now and the
        logged-in subscribers are told. If that logged *another* application out, it was
        a disturbance: further logins on the token, except by those logged out, are held
        back (1 s, doubling per disturbance up to the maximum) — from any connection, so
        reconnecting does not help. A user mistyping alone is never held back."""
        key = instance.key
        disturbed = {o.id for o in self.apps.values() if o is not app and key in o.logins}
        self._lost_card_login(instance, "wrong_pin")
        if not disturbed:
            return
        previous = self._pin_failures.get(instance.key)
        count = 1 if previous is None else previous.count + 1
        delay = min(
            self.limits.wrong_pin_backoff * (2 ** (count - 1)), self.limits.wrong_pin_backoff_max
        )
        victims = disturbed | (previous.victims if previous is not None else set())
        self._pin_failures[instance.key] = _PinFailures(count, time.monotonic() + delay, victims)
        log.warning(
            "slot %d: a wrong PIN (%s) logged %d other application(s) out; logins held back %.0f s",
            instance.slot_id,
            app.peer,
            len(disturbed),
            delay,
        )

    async def _verify(self, app: Application, session: Session, pin: bytearray) -> None:
        """VERIFY under the token's login lock, with the wrong-PIN rules."""
        instance = session.instance
        self._check_backoff(app, instance)
        try:
            await self._card(session, instance.token.login, pin)
        except (PinIncorrectError, PinLockedError):  # the try that blocks the PIN is one too
            self._wrong_pin(app, instance)
            raise
        failures = self._pin_failures.get(instance.key)
        if failures is not None and app.id not in failures.victims:
            del self._pin_failures[instance.key]  # the user is back: the count starts over

    def _forget_context_pins(self, app: Application, instance: TokenInstance) -> None:
        """A context-specific PIN belongs to the login it was given under: it ends with it."""
        for session in app.sessions.values():
            if session.instance is instance and session.operation is not None:
                session.operation.forget_context_pin()

    def _login_lock(self, instance: TokenInstance) -> asyncio.Lock:
        return self._login_locks.setdefault(instance.key, asyncio.Lock())

    # --- for other front ends of the engine (provisioning) -------------------------------

    def session(self, app: Application, handle: int) -> Session:
        """The live session ``handle`` of ``app`` (DeviceRemoved once, then invalid)."""
        return self._session(app, handle)

    async def run_on_card(self, session: Session, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        """Run ``fn`` in the token's executor with the engine's error handling (reset →
        login lost, card refusals mapped)."""
        return await self._card(session, fn, *args, **kwargs)

    def login_lock(self, instance: TokenInstance) -> asyncio.Lock:
        """Held around anything that changes the card's verified state."""
        return self._login_lock(instance)

    def lost_card_login(self, instance: TokenInstance) -> None:
        """Report every application's login on ``instance`` lost (the card forgot it)."""
        self._lost_card_login(instance)

    def forget_objects(self, instance: TokenInstance, refs: Sequence[int] = ()) -> None:
        """Drop the object handles of these key references (all when empty): provisioning
        replaced the objects, so old handles must not reach the new ones."""
        wanted = set(refs)
        for (ikey, okey), handle in list(self._token_handles.items()):
            if ikey == instance.key and (not wanted or okey.ref in wanted):
                del self._token_handles[(ikey, okey)]
                self._token_objects.pop(handle, None)
                for app in self.apps.values():
                    app.known_private.discard(handle)

    async def _card(self, session: Session, fn, *args, **kwargs):  # type: ignore[no-untyped-def]
        instance = session.instance
        try:
            return await instance.run(fn, *args, **kwargs)
        except CardResetError:
            self._lost_card_login(instance)
            raise UserNotLoggedInError(
                "the card was reset by another program; log in again"
            ) from None
        except CardNotVerifiedError:
            # Only the card's own refusal means its login is gone; tokend's and the
            # driver's own "not logged in" refusals leave every login as it is.
            self._lost_card_login(instance)
            raise
        except DeviceRemovedError:
            if session.removed:  # reported now, so from here on the handle is invalid
                self._drop_session(session)
            raise

    # --- slots and tokens ----------------------------------------------------------------

    def slot_list(self, token_present: bool) -> list[int]:
        return [s.slot_id for s in self.registry.slots() if s.token_present or not token_present]

    def slot_info(self, slot_id: int) -> SlotInfo:
        slot = self.registry.slot(slot_id)
        flags = CKF.CKF_REMOVABLE_DEVICE | CKF.CKF_HW_SLOT
        if slot.token_present:
            flags |= CKF.CKF_TOKEN_PRESENT
        return SlotInfo(slot.description, slot.watcher.name, flags)

    def token_state(self, slot_id: int) -> TokenState:
        """Never touches the card: the info was read when the token arrived."""
        instance = self.registry.instance(slot_id)
        info = instance.token.info
        sessions = [s for s in self._sessions.values() if s.instance is instance]
        return TokenState(
            info,
            CKF_TOKEN(info.flags)
            | CKF_TOKEN.CKF_TOKEN_INITIALIZED
            | (
                CKF_TOKEN.CKF_PROTECTED_AUTHENTICATION_PATH
                if self.protected_authentication_path
                else CKF_TOKEN(0)
            ),
            len(sessions),
            sum(1 for s in sessions if s.rw),
            instance.generation,
            instance.token.identity.serial,
            self.limits.max_sessions_per_application,
        )

    def mechanisms(self, slot_id: int) -> list[MechanismInfo]:
        return list(self.registry.instance(slot_id).token.mechanisms())

    def mechanism_info(self, slot_id: int, mechanism: CKM) -> MechanismInfo:
        for info in self.mechanisms(slot_id):
            if info.mechanism == mechanism:
                return info
        raise MechanismInvalidError(f"{mechanism.name} is not supported by this token")

    async def finalize(self, app: Application) -> None:
        """C_Finalize: the application's sessions (hence logins) end; its waits are cancelled."""
        for slot in self.registry.slots():
            await self.close_all_sessions(app, slot.slot_id)
        app.cancel_waits()

    # --- sessions ----------------------------------------------------------------------

    def open_session(self, app: Application, slot_id: int, flags: int) -> int:
        if not flags & CKF_SESSION.CKF_SERIAL_SESSION:
            raise SessionParallelNotSupportedError("CKF_SERIAL_SESSION must be set")
        instance = self.registry.instance(slot_id)
        if len(app.sessions) >= self.limits.max_sessions_per_application:
            # Sessions whose token left hold no place (found by the soak: a client whose
            # sessions all died with the token could open none on its return). Dropping
            # them also lets go of the retired token instances they kept alive.
            for dead in [s for s in app.sessions.values() if s.removed or s.instance.retired]:
                self._drop_session(dead)
        if len(app.sessions) >= self.limits.max_sessions_per_application:
            raise SessionCountError(
                f"{self.limits.max_sessions_per_application} sessions are open on this "
                "connection; close one first"
            )
        handle = next(self._session_ids)
        session = Session(handle, app, instance, rw=bool(flags & CKF_SESSION.CKF_RW_SESSION))
        app.sessions[handle] = session
        self._sessions[handle] = session
        return handle

    def _session(self, app: Application, handle: int) -> Session:
        session = app.sessions.get(handle)
        if session is None:
            raise SessionHandleInvalidError(f"no session {handle}")
        if session.removed or session.instance.retired:
            # Reported once; from then on the handle is simply invalid.
            self._drop_session(session)
            raise DeviceRemovedError(f"the token of session {handle} was removed")
        return session

    def _drop_session(self, session: Session) -> None:
        if session.operation is not None:
            session.operation.wipe()
            session.operation = None
        for obj in session.objects.values():
            obj.wipe()
            self._session_objects.pop(obj.handle, None)
        session.objects.clear()
        session.app.sessions.pop(session.handle, None)
        self._sessions.pop(session.handle, None)

    async def close_session(self, app: Application, handle: int) -> None:
        session = self._session(app, handle)
        self._drop_session(session)
        if not any(s.instance is session.instance for s in app.sessions.values()):
            # PKCS#11: closing the last session of a token logs the application out.
            await self._release_login(app, session.instance.key)

    async def close_all_sessions(self, app: Application, slot_id: int) -> None:
        self.registry.slot(slot_id)
        for session in list(app.sessions.values()):
            if session.slot_id == slot_id:
                self._drop_session(session)
        for key in [k for k in app.logins if k[0] == slot_id]:
            await self._release_login(app, key)

    def session_info(self, app: Application, handle: int) -> dict[str, object]:
        """Never touches the card (NSS polls this)."""
        session = self._session(app, handle)
        logged_in = session.instance.key in app.logins
        if session.rw:
            state = CKS.CKS_RW_USER_FUNCTIONS if logged_in else CKS.CKS_RW_PUBLIC_SESSION
        else:
            state = CKS.CKS_RO_USER_FUNCTIONS if logged_in else CKS.CKS_RO_PUBLIC_SESSION
        flags = CKF_SESSION.CKF_SERIAL_SESSION | (CKF_SESSION.CKF_RW_SESSION if session.rw else 0)
        return {
            "slot_id": session.slot_id,
            "state": state,
            "flags": CKF_SESSION(flags),
            "device_error": 0,
        }

    # --- login -------------------------------------------------------------------------

    @property
    def protected_authentication_path(self) -> bool:
        return self.pin_prompter is not None

    def describe_token(self, instance: TokenInstance) -> TokenDescription:
        token = instance.token
        return TokenDescription(instance.slot_id, token.info.label, token.identity.serial)

    async def login(
        self, app: Application, handle: int, user_type: CKU, pin: bytearray | None
    ) -> None:
        """C_Login. ``pin`` None: the protected authentication path — the daemon asks the
        user through its own prompt (again after a wrong PIN, showing the retries left, up to
        ``pin_prompts`` times); cancel or timeout → CKR_FUNCTION_CANCELED, nothing sent to
        the token."""
        if pin is not None:
            return await self._login(app, handle, user_type, pin)
        session = self._session(app, handle)
        if self.pin_prompter is None:
            raise ArgumentsBadError(
                "no PIN given, and the token has no protected authentication path configured"
            )
        error = ""
        for attempt in range(1, self.pin_prompts + 1):
            # Held back after another program's wrong PIN: say so before asking the user.
            self._check_backoff(app, session.instance)
            request = PinRequest(app.client, self.describe_token(session.instance), attempt, error)
            typed = await self.pin_prompter.ask_pin(request)
            try:
                return await self._login(app, handle, user_type, typed)
            except PinIncorrectError as exc:
                if attempt == self.pin_prompts:
                    raise
                left = f", {exc.retries} tries left" if exc.retries is not None else ""
                error = f"Wrong PIN{left}"
        raise AssertionError("unreachable")

    async def authorize(self, app: Application, instance: TokenInstance, use: Use) -> None:
        """Ask the per-program policy (if any) whether this client may do ``use`` here."""
        if self.authorizer is not None:
            await self.authorizer.authorize(
                UseRequest(app.client, self.describe_token(instance), use)
            )

    async def _login(self, app: Application, handle: int, user_type: CKU, pin: bytearray) -> None:
        try:
            session = self._session(app, handle)
            instance = session.instance
            if user_type == CKU.CKU_CONTEXT_SPECIFIC:
                op = session.operation
                if op is None or not op.always_authenticate:
                    raise OperationNotInitializedError(
                        "CKU_CONTEXT_SPECIFIC needs an operation on an always-authenticate key"
                    )
                if instance.key not in app.logins:
                    raise UserNotLoggedInError("log in as CKU_USER first")
                async with self._login_lock(instance):
                    await self._verify(app, session, pin)
                # Kept only until the operation runs, then verified again right before it
                # inside one exclusive section (nothing may come between, §7).
                op.forget_context_pin()  # a repeated context login replaces only the PIN
                op.context_pin = bytearray(pin)
                return
            if user_type != CKU.CKU_USER:
                raise UserTypeInvalidError("only CKU_USER and CKU_CONTEXT_SPECIFIC are supported")
            if instance.key in app.logins:
                raise UserAlreadyLoggedInError("already logged in to this token")
            async with self._login_lock(instance):
                await self._verify(app, session, pin)
                if instance.key in app.logins:  # a second C_Login raced this one
                    raise UserAlreadyLoggedInError("already logged in to this token")
                app.logins.add(instance.key)
        finally:
            wipe(pin)

    async def logout(self, app: Application, handle: int) -> None:
        session = self._session(app, handle)
        if session.instance.key not in app.logins:
            raise UserNotLoggedInError("not logged in")
        await self._release_login(app, session.instance.key)

    async def _release_login(self, app: Application, key: tuple[int, int]) -> None:
        if key not in app.logins:
            return
        app.logins.discard(key)
        slot = self.registry.slot(key[0])
        instance = slot.instance
        if instance is None or instance.key != key or instance.retired:
            return
        self._forget_context_pins(app, instance)
        # Decided under the login lock: a VERIFY in flight for another application finishes
        # (and is recorded) first, so this reset cannot silently undo it.
        async with self._login_lock(instance):
            if instance.retired or any(key in other.logins for other in self.apps.values()):
                return
            # Last logged-in application of this token: reset the card's security state.
            with contextlib.suppress(Exception):
                await instance.run(instance.token.logout)

    def is_logged_in(self, app: Application, handle: int) -> bool:
        session = self._session(app, handle)
        return session.instance.key in app.logins

    # --- objects -----------------------------------------------------------------------

    def _handle_for(self, instance: TokenInstance, obj: TokenObject) -> int:
        k = (instance.key, obj.key)
        handle = self._token_handles.get(k)
        if handle is None:
            handle = next(self._object_ids)
            self._token_handles[k] = handle
            self._token_objects[handle] = k
        return handle

    def _visible(self, session: Session) -> list[tuple[int, Mapping[CKA, AttributeValue]]]:
        logged_in = session.instance.key in session.app.logins
        out: list[tuple[int, Mapping[CKA, AttributeValue]]] = []
        for obj in session.instance.token.objects():
            private = obj.attributes.get(CKA.CKA_PRIVATE)
            if private and not logged_in:
                continue
            handle = self._handle_for(session.instance, obj)
            if private:
                session.app.known_private.add(handle)
            out.append((handle, obj.attributes))
        for obj in session.objects.values():
            out.append((obj.handle, obj.attributes))
        return out

    def _token_object(self, session: Session, handle: int) -> TokenObject:
        entry = self._token_objects.get(handle)
        if entry is None or entry[0] != session.instance.key:
            raise ObjectHandleInvalidError(f"no object {handle}")
        obj = session.instance.object_index().get(entry[1])
        if obj is None:
            raise ObjectHandleInvalidError(f"object {handle} is gone")
        return obj

    def find_objects_init(
        self, app: Application, handle: int, template: Mapping[CKA, AttributeValue]
    ) -> None:
        session = self._session(app, handle)
        if session.find_results is not None:
            raise OperationActiveError("a search is already active")
        session.find_results = [
            h
            for h, attrs in self._visible(session)
            if all(attrs.get(k, _MISSING) == v for k, v in template.items())
        ]

    def find_objects(self, app: Application, handle: int, max_count: int) -> list[int]:
        session = self._session(app, handle)
        if session.find_results is None:
            raise OperationNotInitializedError("call C_FindObjectsInit first")
        if max_count < 0:
            raise ArgumentsBadError("max_object_count must be >= 0")
        found, session.find_results = (
            session.find_results[:max_count],
            session.find_results[max_count:],
        )
        return found

    def find_objects_final(self, app: Application, handle: int) -> None:
        session = self._session(app, handle)
        if session.find_results is None:
            raise OperationNotInitializedError("no search active")
        session.find_results = None

    def get_attributes(
        self, app: Application, handle: int, obj_handle: int, types: Sequence[CKA]
    ) -> dict[CKA, AttributeValue]:
        """Values of the asked attributes; a missing or sensitive one maps to None."""
        session = self._session(app, handle)
        attrs: Mapping[CKA, AttributeValue]
        if obj_handle in session.objects:
            sobj = session.objects[obj_handle]
            values = {t: sobj.attributes.get(t) for t in types}
            if CKA.CKA_VALUE in values:
                values[CKA.CKA_VALUE] = bytes(sobj.secret)
            return values
        else:
            obj = self._token_object(session, obj_handle)
            if obj.attributes.get(CKA.CKA_PRIVATE) and (
                session.instance.key not in app.logins or obj_handle not in app.known_private
            ):
                raise ObjectHandleInvalidError(f"no object {obj_handle}")
            attrs = obj.attributes
        return {t: attrs.get(t) for t in types}

    def destroy_object(self, app: Application, handle: int, obj_handle: int) -> None:
        session = self._session(app, handle)
        obj = session.objects.pop(obj_handle, None)
        if obj is None:
            raise ObjectHandleInvalidError(
                f"object {obj_handle} is not a session object of this session"
            )
        obj.wipe()
        self._session_objects.pop(obj_handle, None)

    # --- private-key operations --------------------------------------------------------

    def _private_key(self, session: Session, key_handle: int, usage: CKA) -> TokenObject:
        try:
            obj = self._token_object(session, key_handle)
        except ObjectHandleInvalidError:
            raise KeyHandleInvalidError(f"no key {key_handle}") from None
        if obj.attributes.get(CKA.CKA_PRIVATE) and key_handle not in session.app.known_private:
            # Never shown to this application (another one found it): as if it did not
            # exist, so handles reveal nothing about other connections.
            raise KeyHandleInvalidError(f"no key {key_handle}")
        if obj.attributes.get(CKA.CKA_CLASS) != CKO.CKO_PRIVATE_KEY:
            raise KeyTypeInconsistentError("not a private key")
        if not obj.attributes.get(usage):
            raise KeyFunctionNotPermittedError(f"key does not allow {usage.name}")
        if session.instance.key not in session.app.logins:
            raise UserNotLoggedInError("log in to the token first")
        return obj

    def _check_mechanism(self, session: Session, mechanism: Mechanism, usage: CKF_MECH) -> None:
        """The token has the mechanism *for this use* (RSA_X_509 may decrypt but not sign):
        refused at Init, where PKCS#11 consumers expect it, not later at the card."""
        if mechanism.mechanism in session.instance.mechanism_set():
            flags = self._mechanism_flags.get(session.instance.key)
            if flags is None:  # once per token instance: Init is on the hot path
                flags = {m.mechanism: m.flags for m in session.instance.token.mechanisms()}
                self._mechanism_flags[session.instance.key] = flags
            if flags.get(mechanism.mechanism, 0) & usage:
                return
            raise MechanismInvalidError(
                f"{mechanism.mechanism.name} cannot be used for {usage.name} on this token"
            )
        raise MechanismInvalidError(f"{mechanism.mechanism.name} is not supported by the token")

    def _start(self, session: Session, op: Operation) -> None:
        if session.operation is not None:
            raise OperationActiveError("another operation is active in this session")
        session.operation = op

    def decrypt_init(self, app: Application, handle: int, mechanism: Mechanism, key: int) -> None:
        session = self._session(app, handle)
        if mechanism.mechanism not in DECRYPT_MECHANISMS:
            raise MechanismInvalidError(f"{mechanism.mechanism.name} cannot decrypt")
        self._check_mechanism(session, mechanism, CKF_MECH.CKF_DECRYPT)
        obj = self._private_key(session, key, CKA.CKA_DECRYPT)
        if obj.attributes.get(CKA.CKA_KEY_TYPE) != CKK.CKK_RSA:
            raise KeyTypeInconsistentError("decryption needs an RSA key; use ECDH for EC keys")
        self._start(
            session,
            Operation(
                OpKind.DECRYPT,
                mechanism,
                obj,
                key,
                bool(obj.attributes.get(CKA.CKA_ALWAYS_AUTHENTICATE)),
            ),
        )

    async def decrypt(self, app: Application, handle: int, data: bytes) -> bytes:
        session = self._session(app, handle)
        op = self._take(session, OpKind.DECRYPT)
        try:
            self._require_login(session, op)
            await self.authorize(app, session.instance, Use.DECRYPT)
            if op.always_authenticate and op.context_pin is None:
                # Never rely on the card to refuse: the PIN must come with this very
                # decryption, verified right before it in one exclusive section (the driver).
                raise UserNotLoggedInError(
                    "this key needs C_Login(CKU_CONTEXT_SPECIFIC) after C_DecryptInit"
                )
            token = session.instance.token
            return await self._card(
                session, token.decrypt, op.key.key, op.mechanism, data, context_pin=op.context_pin
            )
        finally:
            op.wipe()

    def sign_init(self, app: Application, handle: int, mechanism: Mechanism, key: int) -> None:
        session = self._session(app, handle)
        self._check_mechanism(session, mechanism, CKF_MECH.CKF_SIGN)
        obj = self._private_key(session, key, CKA.CKA_SIGN)
        self._start(
            session,
            Operation(
                OpKind.SIGN,
                mechanism,
                obj,
                key,
                bool(obj.attributes.get(CKA.CKA_ALWAYS_AUTHENTICATE)),
            ),
        )

    def sign_update(self, app: Application, handle: int, data: bytes) -> None:
        session = self._session(app, handle)
        op = session.operation
        if op is None or op.kind is not OpKind.SIGN:
            raise OperationNotInitializedError("call C_SignInit first")
        budget = self.limits.max_multipart_bytes
        buffered = sum(
            len(s.operation.buffer) for s in app.sessions.values() if s.operation is not None
        )
        if buffered + len(data) > budget:
            # PKCS#11: an error in C_SignUpdate ends the operation.
            session.operation = None
            op.wipe()
            raise DataLenRangeError(
                f"multi-part input over {budget} bytes on this connection; hash the data "
                "and sign the digest instead"
            )
        op.buffer += data

    async def sign(self, app: Application, handle: int, data: bytes) -> bytes:
        session = self._session(app, handle)
        op = session.operation
        if op is None or op.kind is not OpKind.SIGN:
            raise OperationNotInitializedError("call C_SignInit first")
        if op.buffer:
            raise OperationActiveError("a multi-part signature is active; call C_SignFinal")
        return await self._finish_sign(session, data)

    async def sign_final(self, app: Application, handle: int) -> bytes:
        session = self._session(app, handle)
        op = session.operation
        if op is None or op.kind is not OpKind.SIGN:
            raise OperationNotInitializedError("call C_SignInit first")
        return await self._finish_sign(session, bytes(op.buffer))

    async def _finish_sign(self, session: Session, data: bytes) -> bytes:
        op = self._take(session, OpKind.SIGN)
        try:
            self._require_login(session, op)
            await self.authorize(session.app, session.instance, Use.SIGN)
            if op.always_authenticate and op.context_pin is None:
                raise UserNotLoggedInError(
                    "this key needs C_Login(CKU_CONTEXT_SPECIFIC) after C_SignInit"
                )
            return await self._card(
                session,
                session.instance.token.sign,
                op.key.key,
                op.mechanism,
                data,
                context_pin=op.context_pin,
            )
        finally:
            op.wipe()

    def cancel_operation(self, app: Application, handle: int) -> None:
        """C_*Init with a NULL mechanism (p11-kit 0.25.3+ clients): end the active
        operation, wiping what it holds."""
        session = self._session(app, handle)
        if session.operation is not None:
            session.operation.wipe()
            session.operation = None

    def output_size(self, app: Application, handle: int) -> int | None:
        """An upper bound of the active sign/decrypt operation's output, known without the
        card (the key's size), so a caller's size query costs no card operation."""
        op = self._session(app, handle).operation
        if op is None:
            raise OperationNotInitializedError("no operation is active")
        attrs = op.key.attributes
        bits = attrs.get(CKA.CKA_MODULUS_BITS)
        if isinstance(bits, int) and bits > 0:
            return (bits + 7) // 8
        params = attrs.get(CKA.CKA_EC_PARAMS)
        if op.kind is OpKind.SIGN and isinstance(params, bytes):
            curve = _EC_FIELD_BYTES.get(_named_curve(params))
            return None if curve is None else 2 * curve
        return None

    def _take(self, session: Session, kind: OpKind) -> Operation:
        op = session.operation
        if op is None or op.kind is not kind:
            raise OperationNotInitializedError(f"call C_{kind.value.capitalize()}Init first")
        session.operation = None  # one-shot: ends on success and on error
        return op

    def _require_login(self, session: Session, op: Operation) -> None:
        if self._token_objects.get(op.key_handle) != (session.instance.key, op.key.key):
            # The key was replaced (provisioning) since the operation started: the key in
            # that slot now is not the one the caller chose.
            raise KeyHandleInvalidError(f"key {op.key_handle} was replaced on the token")
        if session.instance.key not in session.app.logins:
            raise UserNotLoggedInError("not logged in (the login was lost or never made)")

    async def derive_key(
        self,
        app: Application,
        handle: int,
        mechanism: Mechanism,
        base_key: int,
        template: Mapping[CKA, AttributeValue],
    ) -> int:
        session = self._session(app, handle)
        if mechanism.mechanism not in DERIVE_MECHANISMS:
            raise MechanismInvalidError(f"{mechanism.mechanism.name} cannot derive")
        self._check_mechanism(session, mechanism, CKF_MECH.CKF_DERIVE)
        if session.operation is not None:
            raise OperationActiveError("another operation is active in this session")
        obj = self._private_key(session, base_key, CKA.CKA_DERIVE)
        held = sum(len(s.objects) for s in app.sessions.values())
        if held >= self.limits.max_session_objects:
            raise HostMemoryError(
                f"{held} session objects are held on this connection; destroy some first"
            )
        if obj.attributes.get(CKA.CKA_ALWAYS_AUTHENTICATE):
            # C_DeriveKey has no Init, so there is no operation to log in to: refuse here
            # rather than let the card refuse (which would read as a lost login).
            raise UserNotLoggedInError("a PIN-always key cannot be used with C_DeriveKey")
        await self.authorize(app, session.instance, Use.DERIVE)
        secret = bytearray(
            await self._card(session, session.instance.token.derive, obj.key, mechanism)
        )
        if session.removed:
            wipe(secret)
            raise DeviceRemovedError("the token was removed")
        value_len = template.get(CKA.CKA_VALUE_LEN)
        if isinstance(value_len, int) and 0 < value_len < len(secret):
            del secret[value_len:]
        obj_handle = next(self._object_ids)
        attrs: dict[CKA, AttributeValue] = {
            CKA.CKA_CLASS: CKO.CKO_SECRET_KEY,
            CKA.CKA_KEY_TYPE: CKK.CKK_GENERIC_SECRET,
            CKA.CKA_TOKEN: False,
            CKA.CKA_PRIVATE: False,
            CKA.CKA_SENSITIVE: False,
            CKA.CKA_EXTRACTABLE: True,
            CKA.CKA_LOCAL: False,
            CKA.CKA_LABEL: "",
        }
        for k, v in template.items():
            if k not in (CKA.CKA_CLASS, CKA.CKA_VALUE):
                attrs[k] = v
        attrs[CKA.CKA_VALUE_LEN] = len(secret)
        sobj = SessionObject(obj_handle, handle, attrs, secret)
        session.objects[obj_handle] = sobj
        self._session_objects[obj_handle] = sobj
        return obj_handle

    # --- events ------------------------------------------------------------------------

    async def wait_for_slot_event(self, app: Application, dont_block: bool) -> int:
        return await app.wait_for_slot_event(dont_block)


_MISSING = object()
_EC_FIELD_BYTES = {"secp256r1": 32, "secp384r1": 48, "secp521r1": 66}


def _named_curve(ec_params: bytes) -> str | None:
    try:
        params = ECDomainParameters.load(ec_params)
        return str(params.chosen.native) if params.name == "named" else None
    except ValueError:
        return None
