"""Vendor PKCS#11 modules as tokend tokens (python-pkcs11; the only module that imports it).

Many USB keys ship only a vendor PKCS#11 module. `ModuleWatcher` loads one module (a
``.so`` path from the configuration or ``--module``) and reports each of its slots holding
an initialised token as a tokend slot; `ModuleToken` is that token behind the `Token` seam,
so the session engine applies the same disconnect rule and per-application logins to it as
to a PIV card.

How the parts map onto a module:

* **Slots.** One tokend slot per module slot, named ``"<label> slot 0x<module slot id>"``
  after the module's configured label; the registry keeps the id for the daemon's life.
* **Presence.** A token is present while its slot has CKF_TOKEN_PRESENT, C_GetTokenInfo
  answers and shows CKF_TOKEN_INITIALIZED. The watcher calls the module's blocking
  C_WaitForSlotEvent on a thread of its own; most modules (SoftHSM2 among them) answer
  CKR_FUNCTION_NOT_SUPPORTED, and then presence is polled every `POLL_INTERVAL_S`. Events,
  when they work, only trigger a poll early. Every poll also fingerprints the token's public
  objects: a token re-initialised or re-provisioned behind tokend's back (an object
  disappeared or appeared) is a *different* token instance (LEFT, then ARRIVED), the way an
  identity mismatch is for a card (§5.1). A module call failing with a "gone" code
  (CKR_DEVICE_REMOVED, CKR_TOKEN_NOT_PRESENT, CKR_SESSION_CLOSED, ...) retires the instance at
  once and wakes the poller. An operation failing with a code that a token deleted or
  re-initialised under the call also gives (CKR_OBJECT_HANDLE_INVALID,
  CKR_KEY_HANDLE_INVALID, CKR_GENERAL_ERROR) first asks the token whether it is still this
  instance's (present, same serial, same public objects, the key still there): if not, it
  is a removal too, so the caller hears CKR_DEVICE_REMOVED, not a code about its key.
* **Isolation.** Every module call from the daemon has a timeout (`CALL_TIMEOUT_S`): a call
  that does not return retires the token, and the watcher reports all of the module's
  tokens gone until the stuck call returns; nothing else waits on it. A module that is
  missing, is not a PKCS#11 module or fails C_Initialize is reported in one log line and
  ignored. A module that *crashes* the process (SIGSEGV) is not contained: modules run
  in-process (docs/architecture.md says why).
* **Login.** PKCS#11 login is per process, i.e. one login for the whole daemon. The session
  engine keeps the per-application logins; this driver makes the module's login follow them:
  every application's C_Login reaches the module (a logged-in module is logged out and
  logged in again with the new PIN, so the module checks every PIN and counts every wrong
  one), and the engine's last logout calls `logout` (C_Logout). A wrong PIN therefore ends
  the module's login for everyone, exactly as a failed VERIFY does on a PIV card; the
  others see CKR_USER_NOT_LOGGED_IN and log in again. PIN bytes go to C_Login straight from
  the caller's ``bytearray`` (ctypes, no copy) so the caller's wipe is the only copy.
* **Concurrency.** The module is initialised with CKF_OS_LOCKING_OK. If it accepts, the
  token takes `ModuleConfig.workers` calls at once, each on its own module session; if it
  answers CKR_CANT_LOCK it is initialised without locking and every call to it, from any
  thread, is serialised. (python-pkcs11 itself always passes NULL to C_Initialize, which
  tells the module it will never be called from two threads at once: SoftHSM2 then turns
  its own mutexes off. The initialisation is therefore done here, through the module's
  function list.)
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pkcs11
from asn1crypto import keys as asn1_keys
from pkcs11 import _pkcs11
from pkcs11 import exceptions as p11x

from tokend.config_values import MODULE_FIELDS, check_table, module_label
from tokend.drivers.base import ReaderEvent, ReaderEventKind
from tokend.errors import (
    CardNotVerifiedError,
    KeyFunctionNotPermittedError,
    MechanismParamInvalidError,
    PinIncorrectError,
    PinLockedError,
    TokendError,
    TransportError,
)
from tokend.mechanisms.tables import ECDSA_HASHED
from tokend.model import (
    AttributeValue,
    Ecdh1DeriveParams,
    Mechanism,
    MechanismInfo,
    OaepParams,
    ObjectKey,
    ObjectKind,
    PinStatus,
    PssParams,
    TokenIdentity,
    TokenInfo,
    TokenObject,
)
from tokend.pkcs11 import CKA, CKF_MECH, CKF_TOKEN, CKM, CKR, CKU, ULONG_ATTRIBUTES

log = logging.getLogger(__name__)

T = TypeVar("T")

#: Presence poll for modules without a working C_WaitForSlotEvent (most of them). 0.5 s is
#: scdaemon's ticker and just above pcscd's 400 ms card poll: removal shows within it.
POLL_INTERVAL_S = 0.5
#: A module call (an operation, a poll, C_Login) that takes longer is treated as hung.
CALL_TIMEOUT_S = 10.0
#: Loading and C_Initialize may take longer (a module may scan USB buses).
LOAD_TIMEOUT_S = 20.0
#: A token whose C_GetTokenInfo fails with CKR_GENERAL_ERROR is asked again this many times
#: (SCAN_RETRY_S apart) before it counts as gone.
SCAN_ATTEMPTS = 3
SCAN_RETRY_S = 0.02
#: Parallel calls per token when the module accepts OS locking (see docs/performance.md).
DEFAULT_WORKERS = 4

CKF_OS_LOCKING_OK = 0x2
CKR_CANT_LOCK = 0x0A
CKR_CRYPTOKI_ALREADY_INITIALIZED = 0x191

APPLET = "PKCS11-MODULE"


@dataclass(frozen=True, slots=True)
class ModuleConfig:
    """One configured module: ``modules = [{path = "...", label = "..."}]``."""

    path: Path
    label: str
    workers: int = DEFAULT_WORKERS
    poll_interval: float = POLL_INTERVAL_S
    call_timeout: float = CALL_TIMEOUT_S

    @classmethod
    def from_path(cls, path: str | Path) -> ModuleConfig:
        """``--module PATH``: labelled after the file (``libsofthsm2.so`` → ``softhsm2``)."""
        return cls(Path(path), module_label(str(path)))

    @classmethod
    def from_table(cls, table: dict[str, Any]) -> ModuleConfig:
        """One ``[[modules]]`` table: path, and optionally label, timeout (the per-call
        timeout, s), workers, poll_interval (s). Checked as `tokend check-config` checks it
        (tokend.config_values); a bad value is a ValueError naming its key."""
        checked = check_table(table, MODULE_FIELDS)
        base = cls.from_path(checked["path"])
        return cls(
            base.path,
            checked.get("label", base.label),
            checked.get("workers", DEFAULT_WORKERS),
            checked.get("poll_interval", POLL_INTERVAL_S),
            checked.get("timeout", CALL_TIMEOUT_S),
        )


class ModuleLoadError(Exception):
    """The module cannot be used at all (missing, not PKCS#11, C_Initialize failed)."""


class ModuleHungError(Exception):
    """A module call did not return within its timeout."""


# --- the module's own function list (C_Initialize with locking, C_Login from a bytearray) ---

_CK_RV = ctypes.c_ulong
_C_Initialize = ctypes.CFUNCTYPE(_CK_RV, ctypes.c_void_p)
_C_Finalize = ctypes.CFUNCTYPE(_CK_RV, ctypes.c_void_p)
_C_Login = ctypes.CFUNCTYPE(_CK_RV, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong)
_C_Logout = ctypes.CFUNCTYPE(_CK_RV, ctypes.c_ulong)
#: C_DecryptInit / C_SignInit (hSession, pMechanism, hKey)
_C_OpInit = ctypes.CFUNCTYPE(_CK_RV, ctypes.c_ulong, ctypes.c_void_p, ctypes.c_ulong)
#: C_Decrypt / C_Sign (hSession, pData, ulDataLen, pOut, pulOutLen)
_C_Op = ctypes.CFUNCTYPE(
    _CK_RV,
    ctypes.c_ulong,
    ctypes.c_void_p,
    ctypes.c_ulong,
    ctypes.c_void_p,
    ctypes.POINTER(ctypes.c_ulong),
)


def _unused(*names: str) -> list[tuple[str, type]]:
    return [(name, ctypes.c_void_p) for name in names]


class _FunctionList(ctypes.Structure):
    # CK_FUNCTION_LIST up to C_Sign, in the order of pkcs11f.h; only the typed entries are
    # called (the rest go through python-pkcs11).
    _fields_ = [
        ("version", ctypes.c_ubyte * 2),
        ("C_Initialize", _C_Initialize),
        ("C_Finalize", _C_Finalize),
        *(
            (name, ctypes.c_void_p)
            for name in (
                "C_GetInfo",
                "C_GetFunctionList",
                "C_GetSlotList",
                "C_GetSlotInfo",
                "C_GetTokenInfo",
                "C_GetMechanismList",
                "C_GetMechanismInfo",
                "C_InitToken",
                "C_InitPIN",
                "C_SetPIN",
                "C_OpenSession",
                "C_CloseSession",
                "C_CloseAllSessions",
                "C_GetSessionInfo",
                "C_GetOperationState",
                "C_SetOperationState",
            )
        ),
        ("C_Login", _C_Login),
        ("C_Logout", _C_Logout),
        *_unused(
            "C_CreateObject",
            "C_CopyObject",
            "C_DestroyObject",
            "C_GetObjectSize",
            "C_GetAttributeValue",
            "C_SetAttributeValue",
            "C_FindObjectsInit",
            "C_FindObjects",
            "C_FindObjectsFinal",
            "C_EncryptInit",
            "C_Encrypt",
            "C_EncryptUpdate",
            "C_EncryptFinal",
        ),
        ("C_DecryptInit", _C_OpInit),
        ("C_Decrypt", _C_Op),
        *_unused(
            "C_DecryptUpdate",
            "C_DecryptFinal",
            "C_DigestInit",
            "C_Digest",
            "C_DigestUpdate",
            "C_DigestKey",
            "C_DigestFinal",
        ),
        ("C_SignInit", _C_OpInit),
        ("C_Sign", _C_Op),
    ]


class _CkMechanism(ctypes.Structure):
    _fields_ = [
        ("mechanism", ctypes.c_ulong),
        ("pParameter", ctypes.c_void_p),
        ("ulParameterLen", ctypes.c_ulong),
    ]


class _CkOaepParams(ctypes.Structure):
    _fields_ = [
        ("hashAlg", ctypes.c_ulong),
        ("mgf", ctypes.c_ulong),
        ("source", ctypes.c_ulong),  # CKZ_DATA_SPECIFIED
        ("pSourceData", ctypes.c_void_p),
        ("ulSourceDataLen", ctypes.c_ulong),
    ]


class _CkPssParams(ctypes.Structure):
    _fields_ = [("hashAlg", ctypes.c_ulong), ("mgf", ctypes.c_ulong), ("sLen", ctypes.c_ulong)]


CKZ_DATA_SPECIFIED = 1
#: Output buffer of one context-login operation: a signature or an RSA plaintext of a key
#: up to 8192 bits fits, so one call does it (no length query, no CKR_BUFFER_TOO_SMALL).
_OP_OUTPUT = 1024


class _InitArgs(ctypes.Structure):
    _fields_ = [
        ("CreateMutex", ctypes.c_void_p),
        ("DestroyMutex", ctypes.c_void_p),
        ("LockMutex", ctypes.c_void_p),
        ("UnlockMutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("pReserved", ctypes.c_void_p),
    ]


def _ckr_name(rv: int) -> str:
    try:
        return CKR(rv).name
    except ValueError:
        return f"CKR_0x{rv:08X}"


# --- error mapping: python-pkcs11 exception classes back to the CKR they stand for -----------

_EXCEPTION_CKR: dict[str, CKR] = {
    "AttributeTypeInvalid": CKR.CKR_ATTRIBUTE_TYPE_INVALID,
    "AttributeValueInvalid": CKR.CKR_ATTRIBUTE_VALUE_INVALID,
    "AttributeReadOnly": CKR.CKR_ATTRIBUTE_READ_ONLY,
    "AttributeSensitive": CKR.CKR_ATTRIBUTE_SENSITIVE,
    "ArgumentsBad": CKR.CKR_ARGUMENTS_BAD,
    "DataInvalid": CKR.CKR_DATA_INVALID,
    "DataLenRange": CKR.CKR_DATA_LEN_RANGE,
    "DomainParamsInvalid": CKR.CKR_DOMAIN_PARAMS_INVALID,
    "DeviceError": CKR.CKR_DEVICE_ERROR,
    "DeviceMemory": CKR.CKR_DEVICE_MEMORY,
    "DeviceRemoved": CKR.CKR_DEVICE_REMOVED,
    "EncryptedDataInvalid": CKR.CKR_ENCRYPTED_DATA_INVALID,
    "EncryptedDataLenRange": CKR.CKR_ENCRYPTED_DATA_LEN_RANGE,
    "FunctionCancelled": CKR.CKR_FUNCTION_CANCELED,
    "FunctionFailed": CKR.CKR_FUNCTION_FAILED,
    "FunctionRejected": CKR.CKR_FUNCTION_REJECTED,
    "FunctionNotSupported": CKR.CKR_FUNCTION_NOT_SUPPORTED,
    "KeyHandleInvalid": CKR.CKR_KEY_HANDLE_INVALID,
    "KeySizeRange": CKR.CKR_KEY_SIZE_RANGE,
    "KeyTypeInconsistent": CKR.CKR_KEY_TYPE_INCONSISTENT,
    "GeneralError": CKR.CKR_GENERAL_ERROR,
    "HostMemory": CKR.CKR_HOST_MEMORY,
    "MechanismInvalid": CKR.CKR_MECHANISM_INVALID,
    "MechanismParamInvalid": CKR.CKR_MECHANISM_PARAM_INVALID,
    "NoEvent": CKR.CKR_NO_EVENT,
    "ObjectHandleInvalid": CKR.CKR_OBJECT_HANDLE_INVALID,
    "OperationActive": CKR.CKR_OPERATION_ACTIVE,
    "OperationNotInitialized": CKR.CKR_OPERATION_NOT_INITIALIZED,
    "PinExpired": CKR.CKR_PIN_EXPIRED,
    "PinIncorrect": CKR.CKR_PIN_INCORRECT,
    "PinInvalid": CKR.CKR_PIN_INVALID,
    "PinLenRange": CKR.CKR_PIN_LEN_RANGE,
    "PinLocked": CKR.CKR_PIN_LOCKED,
    "SessionClosed": CKR.CKR_SESSION_CLOSED,
    "SessionCount": CKR.CKR_SESSION_COUNT,
    "SessionExists": CKR.CKR_SESSION_EXISTS,
    "SessionHandleInvalid": CKR.CKR_SESSION_HANDLE_INVALID,
    "SessionReadOnly": CKR.CKR_SESSION_READ_ONLY,
    "SessionReadOnlyExists": CKR.CKR_SESSION_READ_ONLY_EXISTS,
    "SessionReadWriteSOExists": CKR.CKR_SESSION_READ_WRITE_SO_EXISTS,
    "SignatureLenRange": CKR.CKR_SIGNATURE_LEN_RANGE,
    "SignatureInvalid": CKR.CKR_SIGNATURE_INVALID,
    "TemplateIncomplete": CKR.CKR_TEMPLATE_INCOMPLETE,
    "TemplateInconsistent": CKR.CKR_TEMPLATE_INCONSISTENT,
    "SlotIDInvalid": CKR.CKR_SLOT_ID_INVALID,
    "TokenNotPresent": CKR.CKR_TOKEN_NOT_PRESENT,
    "TokenNotRecognised": CKR.CKR_TOKEN_NOT_RECOGNIZED,
    "TokenWriteProtected": CKR.CKR_TOKEN_WRITE_PROTECTED,
    "UserNotLoggedIn": CKR.CKR_USER_NOT_LOGGED_IN,
    "UserAlreadyLoggedIn": CKR.CKR_USER_ALREADY_LOGGED_IN,
    "AnotherUserAlreadyLoggedIn": CKR.CKR_USER_ANOTHER_ALREADY_LOGGED_IN,
    "UserPinNotInitialized": CKR.CKR_USER_PIN_NOT_INITIALIZED,
    "UserTooManyTypes": CKR.CKR_USER_TOO_MANY_TYPES,
}
_CKR_BY_CLASS: dict[type[BaseException], CKR] = {
    getattr(p11x, name): ckr for name, ckr in _EXCEPTION_CKR.items() if hasattr(p11x, name)
}
#: Return values meaning the token (or our module session on it) is gone: a disconnect.
GONE_CKRS = frozenset(
    {
        CKR.CKR_DEVICE_REMOVED,
        CKR.CKR_DEVICE_ERROR,
        CKR.CKR_TOKEN_NOT_PRESENT,
        CKR.CKR_TOKEN_NOT_RECOGNIZED,
        CKR.CKR_SESSION_CLOSED,
        CKR.CKR_SESSION_HANDLE_INVALID,
        CKR.CKR_CRYPTOKI_NOT_INITIALIZED,
    }
)

#: Return values that also come back when the token was deleted or re-initialised under the
#: call (SoftHSM2 answers CKR_OBJECT_HANDLE_INVALID for a key whose token went away, and
#: CKR_GENERAL_ERROR for a deleted token): the token is asked whether it is still the one
#: this instance opened before the code is passed on (`ModuleToken._still_ours`).
MAYBE_GONE_CKRS = frozenset(
    {CKR.CKR_OBJECT_HANDLE_INVALID, CKR.CKR_KEY_HANDLE_INVALID, CKR.CKR_GENERAL_ERROR}
)


def ckr_of(exc: BaseException) -> int:
    """The CKR a python-pkcs11 exception (or a raw code we raised) stands for."""
    code = getattr(exc, "ckr", None)
    if isinstance(code, int):
        return code
    for klass in type(exc).__mro__:
        if klass in _CKR_BY_CLASS:
            return _CKR_BY_CLASS[klass]
    if "not initialized" in str(exc):
        return CKR.CKR_CRYPTOKI_NOT_INITIALIZED
    return CKR.CKR_GENERAL_ERROR


class _RawCkr(p11x.PKCS11Error):
    """A code from a call made through the function list (not through python-pkcs11)."""

    def __init__(self, rv: int, what: str) -> None:
        super().__init__(f"{what}: {_ckr_name(rv)}")
        self.ckr = rv


# --- one loaded module ---------------------------------------------------------------------

#: Module files loaded by this process: a module's state is per process, so two loaders of
#: one file would share (and finalize) it. path -> the loader that owns it.
_LOADED: dict[str, ModuleLibrary] = {}
_LOADED_LOCK = threading.Condition()


#: The `ModuleLibrary` whose `_Lib` is being constructed on this thread.
_CONSTRUCTING = threading.local()


class _Lib(_pkcs11.lib):  # type: ignore[misc, name-defined]
    """python-pkcs11's library object, with C_Initialize done by `ModuleLibrary` (with
    CKF_OS_LOCKING_OK) instead of python-pkcs11's NULL arguments. Defined once at module
    level: python-pkcs11's finaliser looks methods up on the class when the object dies."""

    def initialize(self) -> None:
        owner = getattr(_CONSTRUCTING, "owner", None)
        if owner is None:
            raise ModuleLoadError("a module can only be initialised through ModuleLibrary")
        owner._initialize()


class ModuleLibrary:
    """A module file loaded and initialised once; shared by its watcher and its tokens, and
    finalised when the last of them lets go."""

    def __init__(self, config: ModuleConfig) -> None:
        self.config = config
        self.lib: Any = None
        self.threaded = False
        self._functions: _FunctionList | None = None
        self._initialized = False
        self._instances: dict[int, int] = {}
        self._users = 0
        self._lock = threading.Lock()
        #: Held around every call when the module refused OS locking.
        self._serial = threading.RLock()

    @property
    def label(self) -> str:
        return self.config.label

    @contextlib.contextmanager
    def guard(self) -> Iterator[None]:
        """Around every module call: serialises them when the module is not thread-safe."""
        if self.threaded:
            yield
        else:
            with self._serial:
                yield

    def load(self) -> None:
        """dlopen + C_Initialize (blocking). Raises ModuleLoadError with a one-line reason."""
        path = self.config.path
        if not path.exists():
            raise ModuleLoadError(f"{path} does not exist")
        try:
            dll = ctypes.CDLL(str(path))
        except OSError as exc:
            raise ModuleLoadError(f"{path} cannot be loaded: {exc}") from None
        try:
            get_function_list = dll.C_GetFunctionList
        except AttributeError:
            raise ModuleLoadError(
                f"{path} is not a PKCS#11 module (it has no C_GetFunctionList)"
            ) from None
        get_function_list.restype = _CK_RV
        get_function_list.argtypes = [ctypes.POINTER(ctypes.POINTER(_FunctionList))]
        pointer = ctypes.POINTER(_FunctionList)()
        rv = get_function_list(ctypes.byref(pointer))
        if rv != 0 or not pointer:
            raise ModuleLoadError(f"{path}: C_GetFunctionList failed ({_ckr_name(rv)})")
        key = str(path.resolve())
        with _LOADED_LOCK:
            # A daemon stopping in this process may still be finalising the same file.
            if not _LOADED_LOCK.wait_for(lambda: key not in _LOADED, timeout=5.0):
                raise ModuleLoadError(f"{path} is already loaded by another module entry")
            _LOADED[key] = self
        self._functions = pointer.contents
        _CONSTRUCTING.owner = self
        try:
            self.lib = _Lib(str(path))
        except Exception as exc:
            if self._initialized:  # C_Initialize worked, something after it did not
                with contextlib.suppress(Exception):
                    self._functions.C_Finalize(None)
            self._unclaim()
            if isinstance(exc, ModuleLoadError):
                raise
            raise ModuleLoadError(f"{path}: {exc}") from None
        finally:
            _CONSTRUCTING.owner = None
        self._users = 1

    def _initialize(self) -> None:
        assert self._functions is not None
        args = _InitArgs(flags=CKF_OS_LOCKING_OK)
        rv = self._functions.C_Initialize(ctypes.addressof(args))
        if rv == CKR_CANT_LOCK:
            rv = self._functions.C_Initialize(None)
            self.threaded = False
        else:
            self.threaded = rv == 0
        if rv == CKR_CRYPTOKI_ALREADY_INITIALIZED:
            raise ModuleLoadError(f"{self.config.path}: already initialised in this process")
        if rv != 0:
            raise ModuleLoadError(f"{self.config.path}: C_Initialize failed ({_ckr_name(rv)})")
        self._initialized = True

    def acquire(self) -> None:
        with self._lock:
            self._users += 1

    def release(self) -> None:
        """Let go; the last user finalises the module (C_Finalize) and frees the path."""
        with self._lock:
            self._users -= 1
            last = self._users == 0
        if last and self._functions is not None:
            with self.guard():
                self._functions.C_Finalize(None)
            self._functions = None
            self._unclaim()

    def _unclaim(self) -> None:
        with _LOADED_LOCK:
            key = str(self.config.path.resolve())
            if _LOADED.get(key) is self:
                del _LOADED[key]
            _LOADED_LOCK.notify_all()

    def new_instance(self, slot_id: int) -> int:
        """Number a new token instance on ``slot_id`` (see `ModuleToken.close`)."""
        with self._lock:
            self._instances[slot_id] = self._instances.get(slot_id, 0) + 1
            return self._instances[slot_id]

    def latest_instance(self, slot_id: int) -> int:
        with self._lock:
            return self._instances.get(slot_id, 0)

    def login(self, session_handle: int, pin: bytearray) -> None:
        """C_Login(CKU_USER) with the PIN read straight out of the caller's buffer."""
        assert self._functions is not None
        buf = (ctypes.c_ubyte * max(1, len(pin))).from_buffer(pin) if pin else None
        with self.guard():
            rv = self._functions.C_Login(
                session_handle, CKU.CKU_USER, ctypes.addressof(buf) if buf else None, len(pin)
            )
        del buf  # releases the export of the bytearray so the caller can wipe it
        if rv != 0:
            raise _RawCkr(rv, "C_Login")

    def logout(self, session_handle: int) -> None:
        assert self._functions is not None
        with self.guard():
            rv = self._functions.C_Logout(session_handle)
        if rv not in (0, CKR.CKR_USER_NOT_LOGGED_IN):
            raise _RawCkr(rv, "C_Logout")

    def context_operation(
        self,
        session_handle: int,
        key_handle: int,
        sign: bool,
        mechanism: Mechanism,
        pin: bytearray,
        data: bytes,
    ) -> bytes:
        """C_DecryptInit/C_SignInit, C_Login(CKU_CONTEXT_SPECIFIC) with ``pin``, then
        C_Decrypt/C_Sign: what a key with CKA_ALWAYS_AUTHENTICATE needs, and what
        python-pkcs11 (Init and the operation in one call) has no place for."""
        f = self._functions
        assert f is not None
        init, operate = (f.C_SignInit, f.C_Sign) if sign else (f.C_DecryptInit, f.C_Decrypt)
        what = "C_Sign" if sign else "C_Decrypt"
        mech, _keep = _raw_mechanism(mechanism)
        data_buf = ctypes.create_string_buffer(bytes(data), max(1, len(data)))
        out = (ctypes.c_ubyte * _OP_OUTPUT)()
        out_len = ctypes.c_ulong(_OP_OUTPUT)
        pin_buf = (ctypes.c_ubyte * max(1, len(pin))).from_buffer(pin) if pin else None
        try:
            with self.guard():
                rv = init(session_handle, ctypes.addressof(mech), key_handle)
                if rv != 0:
                    raise _RawCkr(rv, f"{what}Init")
                rv = f.C_Login(
                    session_handle,
                    CKU.CKU_CONTEXT_SPECIFIC,
                    ctypes.addressof(pin_buf) if pin_buf else None,
                    len(pin),
                )
                if rv != 0:
                    # A failed login leaves the operation active; the operation call ends
                    # it (it fails: the key was not unlocked), so the session stays usable.
                    end_len = ctypes.c_ulong(_OP_OUTPUT)
                    operate(session_handle, data_buf, len(data), out, ctypes.byref(end_len))
                    raise _RawCkr(rv, "C_Login")
                rv = operate(session_handle, data_buf, len(data), out, ctypes.byref(out_len))
                if rv != 0:
                    raise _RawCkr(rv, what)
                return bytes(out[: out_len.value])
        finally:
            del pin_buf  # releases the export of the bytearray so the caller can wipe it
            ctypes.memset(out, 0, _OP_OUTPUT)  # a plaintext never outlives the call
            ctypes.memset(data_buf, 0, ctypes.sizeof(data_buf))

    def slot(self, slot_id: int) -> Any:
        with self.guard():
            for slot in self.lib.get_slots():
                if slot.slot_id == slot_id:
                    return slot
        raise _RawCkr(CKR.CKR_SLOT_ID_INVALID, f"slot {slot_id:#x}")


def reader_name(label: str, slot_id: int) -> str:
    return f"{label} slot {slot_id:#x}"


# --- the watcher ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ModuleSlot:
    """What `ModuleWatcher.connect` hands the registry: the way to one module slot. It has
    the `Transport` attributes so the registry can hold it; there are no APDUs to send."""

    library: ModuleLibrary
    slot_id: int
    reader: str
    wake: Callable[[], None]
    #: Tells the watcher the instance on this slot is over, so it reports the token again.
    forget: Callable[[str, int], None]
    #: Which of the watcher's reports (ARRIVED) of this reader this connection answers.
    arrival: int = 0
    extended: bool = False

    def atr(self) -> bytes:
        return b""

    def transmit(self, apdu: bytes) -> bytes:
        raise TransportError("a PKCS#11 module slot carries no APDUs")

    def transaction(self) -> contextlib.AbstractContextManager[None]:
        return contextlib.nullcontext()

    def close(self) -> None:
        pass


class ModuleWatcher:
    """Loads one module and reports its tokens arriving and leaving (see the module doc)."""

    def __init__(self, config: ModuleConfig) -> None:
        self.config = config
        self.name = f"module:{config.label}"
        #: The registry does not re-probe after a failure: `forget` makes this watcher report
        #: the token again once the module answers.
        self.reports_returns = True
        self._forgotten: set[tuple[str, int]] = set()
        #: reader -> number of ARRIVED reports so far (a closing instance names its own)
        self._arrivals: dict[str, int] = {}
        self.library = ModuleLibrary(config)
        #: How long the registry waits for `open_token` (it reads the token's objects).
        self.probe_timeout = config.call_timeout
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=f"module-{config.label}")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._closed = False
        self._loaded = False
        self._stuck: Future[Any] | None = None
        self._watch_sessions: dict[int, Any] = {}
        self._event_thread: threading.Thread | None = None
        #: "loading", "ready", "failed: …", "hung": for logs and tests
        self.state = "loading"

    # --- the Watcher protocol ------------------------------------------------------------

    async def events(self) -> AsyncIterator[ReaderEvent]:
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        label, path = self.config.label, self.config.path
        try:
            await self._call(self.library.load, timeout=LOAD_TIMEOUT_S)
        except ModuleLoadError as exc:
            self.state = f"failed: {exc}"
            log.error("module %s not used: %s", label, exc)
            return
        except ModuleHungError:
            self.state = "failed: C_Initialize hung"
            log.error(
                "module %s not used: %s did not initialise within %.0f s",
                label,
                path,
                LOAD_TIMEOUT_S,
            )
            return
        except Exception as exc:  # anything else a broken module does: still one line
            self.state = f"failed: {exc}"
            log.error("module %s not used: %s: %s", label, path, exc)
            return
        self._loaded = True
        self.state = "ready"
        log.info(
            "module %s: %s loaded (%s)",
            label,
            path,
            "thread-safe" if self.library.threaded else "serialised: no OS locking",
        )
        self._start_event_thread()
        present: dict[str, tuple[object, ...]] = {}
        while not self._closed:
            try:
                snapshot = await self._call(self._scan)
            except ModuleHungError:
                log.error(
                    "module %s: no answer within %.0f s; its tokens count as removed until it "
                    "answers again",
                    label,
                    self.config.call_timeout,
                )
                self.state = "hung"
                for reader in sorted(present):
                    yield ReaderEvent(ReaderEventKind.LEFT, reader)
                present = {}
                await self._until_unstuck()
                self.state = "ready"
                continue
            except Exception as exc:
                log.warning("module %s: slot scan failed: %s", label, exc)
                snapshot = {}
            for reader, arrival in self._forgotten:
                if arrival == self._arrivals.get(reader):
                    # The instance of the latest report ended on a failure while the token
                    # stayed: a token there is news again.
                    present.pop(reader, None)
            self._forgotten.clear()
            for reader in sorted(present):
                if snapshot.get(reader) != present[reader]:
                    yield ReaderEvent(ReaderEventKind.LEFT, reader)
            for reader in sorted(snapshot):
                if present.get(reader) != snapshot[reader]:
                    self._arrivals[reader] = self._arrivals.get(reader, 0) + 1
                    yield ReaderEvent(ReaderEventKind.ARRIVED, reader)
            present = snapshot
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.config.poll_interval)
            self._wake.clear()

    async def connect(self, reader: str) -> ModuleSlot:
        slot_id = int(reader.rsplit("0x", 1)[1], 16)
        arrival = self._arrivals.get(reader, 0)
        return ModuleSlot(self.library, slot_id, reader, self.wake, self.forget, arrival)

    def open_token(self, transport: Any) -> ModuleToken | None:
        """The applet opener for this watcher's slots (blocking; the registry runs it off the
        loop with `probe_timeout`)."""
        if not isinstance(transport, ModuleSlot):
            return None
        return ModuleToken.open(transport, self.config)

    async def aclose(self) -> None:
        self._closed = True
        if self._wake is not None:
            self._wake.set()
        if self._loaded:
            self._loaded = False

            def _finish() -> None:
                for session in self._watch_sessions.values():
                    with contextlib.suppress(Exception), self.library.guard():
                        session.close()
                self._watch_sessions.clear()
                self.library.release()

            # A hung module keeps its thread; do not wait for it.
            if self._stuck is None or self._stuck.done():
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(
                        asyncio.wrap_future(self._executor.submit(_finish)),
                        self.config.call_timeout,
                    )
        self._executor.shutdown(wait=False)

    # --- internals ---------------------------------------------------------------------

    def forget(self, reader: str, arrival: int) -> None:
        """The registry's instance on ``reader`` made from report ``arrival`` ended (from
        any thread): if that is still the latest report, report the token again."""

        def _forget() -> None:
            self._forgotten.add((reader, arrival))
            if self._wake is not None:
                self._wake.set()

        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(_forget)

    def wake(self) -> None:
        """Poll now (a token call failed in a way that may mean the token is gone)."""
        loop, event = self._loop, self._wake
        if loop is None or event is None or loop.is_closed():
            return
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:
            event.set()
        else:
            loop.call_soon_threadsafe(event.set)

    async def _call(self, fn: Callable[..., T], *args: Any, timeout: float | None = None) -> T:
        if self._stuck is not None and not self._stuck.done():
            raise ModuleHungError("an earlier call has not returned")
        future = self._executor.submit(fn, *args)
        try:
            return await asyncio.wait_for(
                asyncio.shield(asyncio.wrap_future(future)), timeout or self.config.call_timeout
            )
        except TimeoutError:
            self._stuck = future
            raise ModuleHungError(getattr(fn, "__name__", "call")) from None

    async def _until_unstuck(self) -> None:
        while not self._closed and self._stuck is not None and not self._stuck.done():
            await asyncio.sleep(self.config.poll_interval)
        self._stuck = None

    def _start_event_thread(self) -> None:
        """C_WaitForSlotEvent on its own thread, when the module has it and is thread-safe
        (a blocking wait would otherwise hold the module's one lock)."""
        if not self.library.threaded:
            return

        def wait_events() -> None:
            lib = self.library.lib
            fast = 0
            while not self._closed:
                started = time.monotonic()
                try:
                    lib.wait_for_slot_event(blocking=True)
                except (p11x.FunctionNotSupported, p11x.NoEvent):
                    log.info(
                        "module %s: no C_WaitForSlotEvent; polling every %.2f s",
                        self.config.label,
                        self.config.poll_interval,
                    )
                    return
                except TypeError:
                    # python-pkcs11 0.10 answers a successful wait by building its Slot
                    # with a constructor that raises TypeError: the event did happen.
                    pass
                except Exception:
                    return  # C_Finalize ends the wait
                self.wake()
                # A module that "waits" without blocking would spin here: stop after many
                # instant answers in a row and leave presence to the poll.
                fast = fast + 1 if time.monotonic() - started < 0.001 else 0
                if fast > 100:
                    log.info(
                        "module %s: C_WaitForSlotEvent does not block; polling", self.config.label
                    )
                    return

        self._event_thread = threading.Thread(
            target=wait_events, name=f"module-{self.config.label}-events", daemon=True
        )
        self._event_thread.start()

    def _scan(self) -> dict[str, tuple[object, ...]]:
        """reader -> identity of the token present there (blocking, on the watcher thread)."""
        out: dict[str, tuple[object, ...]] = {}
        lib = self.library
        with lib.guard():
            slots = lib.lib.get_slots()
        for slot in slots:
            fingerprint: frozenset[int] | None = None
            if not slot.flags & pkcs11.SlotFlag.TOKEN_PRESENT:
                self._drop_watch_session(slot.slot_id)
                continue
            for attempt in range(SCAN_ATTEMPTS):
                try:
                    with lib.guard():
                        token = slot.get_token()
                        if not token.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED:
                            raise p11x.TokenNotRecognised()
                        fingerprint = self._fingerprint(slot.slot_id, token)
                    break
                except p11x.GeneralError:
                    # SoftHSM2 answers CKR_GENERAL_ERROR for a deleted token, and also when
                    # another process holds the token's files locked for an instant: only an
                    # answer that stays an error counts as gone.
                    self._drop_watch_session(slot.slot_id)
                    if attempt + 1 < SCAN_ATTEMPTS:
                        time.sleep(SCAN_RETRY_S)
                except p11x.PKCS11Error:
                    self._drop_watch_session(slot.slot_id)
                    break
            else:
                continue
            if fingerprint is None:
                continue
            out[reader_name(self.config.label, slot.slot_id)] = (
                _text(token.serial),
                token.label,
                token.manufacturer_id,
                token.model,
                fingerprint,
            )
        return out

    def _fingerprint(self, slot_id: int, token: Any) -> frozenset[int]:
        """The handles of the token's public objects: a re-initialised or re-provisioned
        token has other objects, so it is another token instance."""
        session = self._watch_sessions.get(slot_id)
        if session is None:
            session = self._watch_sessions[slot_id] = token.open()
        try:
            search = session.get_objects({pkcs11.Attribute.PRIVATE: False})
            return frozenset(obj.handle for obj in search)
        except p11x.PKCS11Error:
            self._drop_watch_session(slot_id)
            raise

    def _drop_watch_session(self, slot_id: int) -> None:
        session = self._watch_sessions.pop(slot_id, None)
        if session is not None:
            with contextlib.suppress(Exception):
                session.close()


def _text(value: object) -> str:
    if isinstance(value, bytes):
        return value.decode("ascii", "replace").strip()
    return str(value).strip()


# --- the token -----------------------------------------------------------------------------


class _SharedExclusive:
    """Operations share the module's login; C_Login/C_Logout need it to themselves."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer)
            self._writer = True
            self._cond.wait_for(lambda: self._readers == 0)
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


@dataclass
class _Worker:
    """One module session and the private-key objects as seen from it."""

    session: Any
    keys: dict[ObjectKey, Any]
    epoch: int = -1


#: Attributes read for every object (passed through as the module reports them). Never
#: CKA_VALUE of keys: private and secret values stay on the token.
_COMMON = (CKA.CKA_CLASS, CKA.CKA_TOKEN, CKA.CKA_PRIVATE, CKA.CKA_LABEL, CKA.CKA_ID)
_ATTRIBUTES: dict[int, tuple[CKA, ...]] = {
    pkcs11.ObjectClass.CERTIFICATE: (
        *_COMMON,
        CKA.CKA_CERTIFICATE_TYPE,
        CKA.CKA_VALUE,
        CKA.CKA_SUBJECT,
        CKA.CKA_ISSUER,
        CKA.CKA_SERIAL_NUMBER,
        CKA.CKA_TRUSTED,
        CKA.CKA_MODIFIABLE,
    ),
    pkcs11.ObjectClass.PUBLIC_KEY: (
        *_COMMON,
        CKA.CKA_KEY_TYPE,
        CKA.CKA_SUBJECT,
        CKA.CKA_ENCRYPT,
        CKA.CKA_VERIFY,
        CKA.CKA_VERIFY_RECOVER,
        CKA.CKA_WRAP,
        CKA.CKA_DERIVE,
        CKA.CKA_LOCAL,
        CKA.CKA_MODULUS,
        CKA.CKA_MODULUS_BITS,
        CKA.CKA_PUBLIC_EXPONENT,
        CKA.CKA_EC_PARAMS,
        CKA.CKA_EC_POINT,
        CKA.CKA_MODIFIABLE,
    ),
    pkcs11.ObjectClass.PRIVATE_KEY: (
        *_COMMON,
        CKA.CKA_KEY_TYPE,
        CKA.CKA_SUBJECT,
        CKA.CKA_SENSITIVE,
        CKA.CKA_DECRYPT,
        CKA.CKA_SIGN,
        CKA.CKA_SIGN_RECOVER,
        CKA.CKA_UNWRAP,
        CKA.CKA_DERIVE,
        CKA.CKA_EXTRACTABLE,
        CKA.CKA_LOCAL,
        CKA.CKA_NEVER_EXTRACTABLE,
        CKA.CKA_ALWAYS_SENSITIVE,
        CKA.CKA_ALWAYS_AUTHENTICATE,
        CKA.CKA_MODULUS,
        CKA.CKA_MODULUS_BITS,
        CKA.CKA_PUBLIC_EXPONENT,
        CKA.CKA_EC_PARAMS,
        CKA.CKA_MODIFIABLE,
    ),
}
_EC_FIELD_BYTES = {"secp256r1": 32, "secp384r1": 48, "secp521r1": 66}
#: The kinds of object a module token shows (what mail needs); data objects and secret
#: keys on the token are not passed through.
_KINDS = {
    pkcs11.ObjectClass.CERTIFICATE: ObjectKind.CERTIFICATE,
    pkcs11.ObjectClass.PUBLIC_KEY: ObjectKind.PUBLIC_KEY,
    pkcs11.ObjectClass.PRIVATE_KEY: ObjectKind.PRIVATE_KEY,
}


def _convert(cka: CKA, value: object) -> AttributeValue:
    if isinstance(value, bool):
        return value
    if cka in ULONG_ATTRIBUTES:
        number = int(value)  # type: ignore[call-overload]
        enum = ULONG_ATTRIBUTES[cka]
        if enum is not None:
            with contextlib.suppress(ValueError):
                return enum(number)
        return number
    if isinstance(value, str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, int):
        return int(value)
    return None


class ModuleToken:
    """A module's token behind the `Token` seam. Blocking; runs on its instance's workers."""

    def __init__(self, slot: ModuleSlot, config: ModuleConfig) -> None:
        self._slot = slot
        self._library = slot.library
        self._config = config
        self.workers = max(1, config.workers) if self._library.threaded else 1
        self.call_timeout = config.call_timeout
        self._rw = _SharedExclusive()
        self._pool: queue.SimpleQueue[_Worker] = queue.SimpleQueue()
        self._all_workers: list[_Worker] = []
        self._control: Any = None
        self._logged_in = False
        self._epoch = 0
        self._objects: tuple[TokenObject, ...] = ()
        self._closed = False
        self._generation = 0
        self._identity: TokenIdentity
        self._info: TokenInfo
        self._mechanisms: tuple[MechanismInfo, ...] = ()
        self._emulated: set[CKM] = set()
        #: stable object name -> ObjectKey reference, for this token instance
        self._refs: dict[str, int] = {}
        self._refs_lock = threading.Lock()
        self._pkcs11_token: Any = None
        #: the handles of the token's public token objects when this instance opened it
        self._public: frozenset[int] = frozenset()

    @classmethod
    def open(cls, slot: ModuleSlot, config: ModuleConfig) -> ModuleToken:
        token = cls(slot, config)
        slot.library.acquire()
        try:
            token._open()
        except BaseException:
            token.close()
            raise
        return token

    def _open(self) -> None:
        lib = self._library
        with lib.guard():
            slot = lib.slot(self._slot.slot_id)
            p11token = slot.get_token()
            self._pkcs11_token = p11token
            self._control = p11token.open()
            # A token instance starts logged out, whatever an earlier instance left behind.
            lib.logout(self._control.handle)
            self._generation = lib.new_instance(self._slot.slot_id)
            for _ in range(self.workers):
                worker = _Worker(p11token.open(), {})
                self._all_workers.append(worker)
                self._pool.put(worker)
            serial = _text(p11token.serial)
            self._identity = TokenIdentity(APPLET, serial)
            flags = CKF_TOKEN(int(p11token.flags)) & ~CKF_TOKEN.CKF_TOKEN_INITIALIZED
            self._info = TokenInfo(
                label=p11token.label,
                manufacturer_id=p11token.manufacturer_id,
                model=p11token.model,
                serial_number=serial,
                flags=flags,
                hardware_version=tuple(p11token.hardware_version),  # type: ignore[arg-type]
                firmware_version=tuple(p11token.firmware_version),  # type: ignore[arg-type]
                min_pin_len=int(getattr(p11token, "min_pin_length", 4) or 4),
                max_pin_len=int(getattr(p11token, "max_pin_length", 255) or 255),
            )
            self._mechanisms = tuple(self._read_mechanisms(slot))
            self._objects = self._read_objects()
            self._public = self._public_objects(self._control)

    # --- Token: identity and contents ---------------------------------------------------

    @property
    def identity(self) -> TokenIdentity:
        return self._identity

    @property
    def info(self) -> TokenInfo:
        return self._info

    def mechanisms(self) -> Sequence[MechanismInfo]:
        return self._mechanisms

    def objects(self) -> Sequence[TokenObject]:
        return self._objects

    def pin_status(self) -> PinStatus:
        flags = self._token_flags()
        if flags & pkcs11.TokenFlag.USER_PIN_LOCKED:
            return PinStatus(0)
        if flags & pkcs11.TokenFlag.USER_PIN_FINAL_TRY:
            return PinStatus(1)
        return PinStatus(None)

    def _token_flags(self) -> int:
        with self._library.guard():
            try:
                return int(self._library.slot(self._slot.slot_id).get_token().flags)
            except p11x.PKCS11Error as exc:
                raise self._error(exc) from None

    def _read_mechanisms(self, slot: Any) -> list[MechanismInfo]:
        out = []
        for mech in slot.get_mechanisms():
            try:
                ckm = CKM(int(mech))
            except ValueError:
                continue  # not one tokend names (the mail set and its relatives)
            try:
                info = slot.get_mechanism_info(mech)
            except p11x.PKCS11Error:
                continue
            out.append(
                MechanismInfo(
                    ckm,
                    int(info.min_key_length),
                    int(info.max_key_length),
                    CKF_MECH(int(info.flags) & sum(CKF_MECH)),
                )
            )
        ecdsa = next((m for m in out if m.mechanism == CKM.CKM_ECDSA), None)
        if ecdsa is not None:
            have = {m.mechanism for m in out}
            # Hash-then-ECDSA a module may lack (SoftHSM2 2.6 has only CKM_ECDSA): tokend
            # hashes the (public) data and the module signs the digest, as for a PIV card.
            for ckm in ECDSA_HASHED:
                if ckm not in have:
                    flags = ecdsa.flags & ~CKF_MECH.CKF_HW  # done partly on the host
                    out.append(MechanismInfo(ckm, ecdsa.min_key_size, ecdsa.max_key_size, flags))
                    self._emulated.add(ckm)
        return out

    def _read_objects(self) -> tuple[TokenObject, ...]:
        """Every object the module shows this process now (private ones only after login)."""
        out = []
        for obj in self._control.get_objects():
            cls = obj[pkcs11.Attribute.CLASS]
            wanted = _ATTRIBUTES.get(int(cls), _COMMON)
            attrs = self._attributes(obj, wanted)
            if attrs:
                out.append(attrs)
        return tuple(
            TokenObject(key, attrs)
            for key, attrs in zip(self._object_keys(out), out, strict=True)
            if key is not None
        )

    def _object_keys(self, objects: Sequence[dict[CKA, AttributeValue]]) -> list[ObjectKey | None]:
        """Each object's `ObjectKey`: its kind, and a reference number this token instance
        gives the object's stable name (`_stable_keys`) the first time it sees it."""
        keys: list[ObjectKey | None] = []
        with self._refs_lock:
            for name, attrs in _stable_keys(objects):
                cls = attrs.get(CKA.CKA_CLASS)
                kind = _KINDS.get(int(cls)) if isinstance(cls, int) else None
                if kind is None:
                    keys.append(None)
                    continue
                ref = self._refs.setdefault(name, len(self._refs) + 1)
                keys.append(ObjectKey(kind, ref))
        return keys

    @staticmethod
    def _attributes(obj: Any, wanted: Sequence[CKA]) -> dict[CKA, AttributeValue]:
        types = [pkcs11.Attribute(int(c)) for c in wanted]
        try:
            raw = obj.get_attributes(types)
        except Exception:
            # Some modules fail the whole call for one attribute (and python-pkcs11 cannot
            # decode every type): one at a time then.
            raw = {}
            for t in types:
                with contextlib.suppress(Exception):
                    raw[t] = obj[t]
        attrs: dict[CKA, AttributeValue] = {}
        for key, value in raw.items():
            cka = CKA(int(key))
            with contextlib.suppress(TypeError, ValueError):
                converted = _convert(cka, value)
                if converted is not None:
                    attrs[cka] = converted
        return attrs

    # --- Token: login --------------------------------------------------------------------

    def login(self, pin: bytearray) -> None:
        with self._rw.exclusive():
            lib = self._library
            try:
                if self._logged_in:
                    # Another application's login: the module must check this PIN too.
                    lib.logout(self._control.handle)
                    self._logged_in = False
                    self._epoch += 1
                lib.login(self._control.handle, pin)
            except p11x.PKCS11Error as exc:
                code = ckr_of(exc)
                if code == CKR.CKR_PIN_INCORRECT:
                    flags = self._token_flags()
                    if flags & pkcs11.TokenFlag.USER_PIN_LOCKED:
                        raise PinLockedError() from None
                    final = bool(flags & pkcs11.TokenFlag.USER_PIN_FINAL_TRY)
                    raise PinIncorrectError(retries=1 if final else None) from None
                if code == CKR.CKR_PIN_LOCKED:
                    raise PinLockedError() from None
                raise self._error(exc) from None
            self._logged_in = True
            self._epoch += 1
            with lib.guard():
                try:
                    self._objects = self._read_objects()
                except p11x.PKCS11Error as exc:
                    raise self._error(exc) from None

    def logout(self) -> None:
        with self._rw.exclusive():
            self._logged_in = False
            self._epoch += 1
            try:
                self._library.logout(self._control.handle)
            except p11x.PKCS11Error as exc:
                raise self._error(exc) from None

    # --- Token: private-key operations ---------------------------------------------------

    def decrypt(
        self,
        key: ObjectKey,
        mechanism: Mechanism,
        data: bytes,
        *,
        context_pin: bytearray | None = None,
    ) -> bytes:
        if context_pin is not None:
            return self._context_operation(key, False, mechanism, context_pin, data)
        mech, param = _mechanism(mechanism)
        return self._operate(
            key, lambda obj: obj.decrypt(data, mechanism=mech, mechanism_param=param)
        )

    def sign(
        self,
        key: ObjectKey,
        mechanism: Mechanism,
        data: bytes,
        *,
        context_pin: bytearray | None = None,
    ) -> bytes:
        if mechanism.mechanism in self._emulated:
            data = hashlib.new(ECDSA_HASHED[mechanism.mechanism], data).digest()
            mechanism = Mechanism(CKM.CKM_ECDSA)
        if context_pin is not None:
            return self._context_operation(key, True, mechanism, context_pin, data)
        mech, param = _mechanism(mechanism)
        return self._operate(key, lambda obj: obj.sign(data, mechanism=mech, mechanism_param=param))

    def derive(self, key: ObjectKey, mechanism: Mechanism) -> bytes:
        params = mechanism.params
        if not isinstance(params, Ecdh1DeriveParams):
            raise MechanismParamInvalidError("CKM_ECDH1_DERIVE needs ECDH1 parameters")
        size = self._field_bytes(key)

        def derive(obj: Any) -> bytes:
            secret = obj.derive_key(
                pkcs11.KeyType.GENERIC_SECRET,
                size * 8,
                mechanism=pkcs11.Mechanism.ECDH1_DERIVE,
                mechanism_param=(
                    pkcs11.KDF(int(params.kdf)),
                    params.shared_data or None,
                    params.public_data,
                ),
                template={
                    pkcs11.Attribute.TOKEN: False,
                    pkcs11.Attribute.SENSITIVE: False,
                    pkcs11.Attribute.EXTRACTABLE: True,
                },
            )
            try:
                return bytes(secret[pkcs11.Attribute.VALUE])
            finally:
                # The module's copy of the secret goes with the call (§5.4).
                with contextlib.suppress(p11x.PKCS11Error):
                    secret.destroy()

        return self._operate(key, derive)

    def _field_bytes(self, key: ObjectKey) -> int:
        for obj in self._objects:
            if obj.key == key:
                params = obj.attributes.get(CKA.CKA_EC_PARAMS)
                if isinstance(params, bytes):
                    with contextlib.suppress(ValueError, KeyError):
                        curve = asn1_keys.ECDomainParameters.load(params).native
                        return _EC_FIELD_BYTES[str(curve)]
        raise MechanismParamInvalidError("the key's curve is not one tokend knows")

    def _context_operation(
        self, key: ObjectKey, sign: bool, mechanism: Mechanism, pin: bytearray, data: bytes
    ) -> bytes:
        """A key with CKA_ALWAYS_AUTHENTICATE: the PIN goes with this very operation,
        through the module's own function list on the worker's session."""
        return self._operate(
            key,
            lambda obj: self._library.context_operation(
                obj.session.handle, obj.handle, sign, mechanism, pin, data
            ),
        )

    def _operate(self, key: ObjectKey, fn: Callable[[Any], T]) -> T:
        with self._rw.shared():
            if not self._logged_in:
                # The engine only calls this for a logged-in application, so the module has
                # lost a login tokend believed in (a wrong PIN from another application).
                raise CardNotVerifiedError(f"module {self._config.label}: not logged in")
            worker = self._pool.get()
            try:
                with self._library.guard():
                    obj = self._key_object(worker, key)
                    return fn(obj)
            except p11x.PKCS11Error as exc:
                raise self._error(exc, worker.session, key) from None
            except AttributeError:
                # python-pkcs11 gives an object only the methods its CKA_SIGN/... allow.
                raise KeyFunctionNotPermittedError("the module does not allow that") from None
            finally:
                self._pool.put(worker)

    def _key_object(self, worker: _Worker, key: ObjectKey) -> Any:
        if worker.epoch != self._epoch or key not in worker.keys:
            found = []
            for obj in worker.session.get_objects(
                {pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY}
            ):
                found.append((obj, self._attributes(obj, _COMMON)))
            keys = self._object_keys([attrs for _obj, attrs in found])
            worker.keys = {
                k: obj for k, (obj, _a) in zip(keys, found, strict=True) if k is not None
            }
            worker.epoch = self._epoch
        try:
            return worker.keys[key]
        except KeyError:
            raise p11x.KeyHandleInvalid() from None

    def _error(
        self, exc: BaseException, session: Any = None, key: ObjectKey | None = None
    ) -> TokendError:
        """The tokend error for a module error. ``session`` and ``key``: the module session
        an operation with ``key`` failed on, to ask whether the token is still this
        instance's when the code is one a token deleted or re-initialised under the call
        also gives."""
        code = ckr_of(exc)
        message = f"module {self._config.label}: {_ckr_name(code)}"
        if code in GONE_CKRS:
            self._slot.wake()
            return TransportError(message)
        if code in MAYBE_GONE_CKRS and session is not None and not self._still_ours(session, key):
            # Found by the fault matrix: without this, clients whose token was deleted or
            # re-initialised mid-operation were told CKR_OBJECT_HANDLE_INVALID, not that it
            # left (docs/reliability.md, Findings).
            self._slot.wake()
            return TransportError(f"{message}: the token left or changed under the call")
        if code == CKR.CKR_USER_NOT_LOGGED_IN:
            if session is not None and not self._still_ours(session, None):
                # SoftHSM2's answer mid-operation while its token is being deleted.
                self._slot.wake()
                return TransportError(f"{message}: the token left or changed under the call")
            # The module lost the login tokend believed in (another application's wrong
            # PIN logged it out, or the module reset): the engine forgets every login.
            return CardNotVerifiedError(message)
        if code == CKR.CKR_GENERAL_ERROR:
            self._slot.wake()  # SoftHSM2's answer for a deleted token: check presence now
        return TokendError.from_ckr(code, message)

    @staticmethod
    def _public_objects(session: Any) -> frozenset[int]:
        """The handles of the token's public token objects, as the watcher's fingerprint: a
        re-initialised or re-provisioned token has other ones."""
        template = {pkcs11.Attribute.PRIVATE: False, pkcs11.Attribute.TOKEN: True}
        return frozenset(obj.handle for obj in session.get_objects(template))

    def _still_ours(self, session: Any, key: ObjectKey | None) -> bool:
        """Is the token in our slot still the one this instance opened (present,
        initialised, same serial, same public objects) and does it still hold ``key`` (when
        given)? Called from `_operate`, under the shared lock and logged in: no login or
        logout of ours can happen meanwhile, so the private keys are visible unless the
        token changed (the objects go one by one while another process re-initialises it;
        a module that says it is not logged in is asked without ``key``). Asked on
        ``session`` (the failing worker's: a module session runs one search at a time).
        CKR_GENERAL_ERROR is asked again, as the watcher does: SoftHSM2 gives it for an
        instant while another process holds the token's files."""
        lib = self._library
        for attempt in range(SCAN_ATTEMPTS):
            try:
                with lib.guard():
                    slot = lib.slot(self._slot.slot_id)
                    if not slot.flags & pkcs11.SlotFlag.TOKEN_PRESENT:
                        return False
                    token = slot.get_token()
                    if not token.flags & pkcs11.TokenFlag.TOKEN_INITIALIZED:
                        return False
                    if _text(token.serial) != self._identity.serial:
                        return False
                    if self._public_objects(session) != self._public:
                        return False
                    if key is None:
                        return True
                    search = {pkcs11.Attribute.CLASS: pkcs11.ObjectClass.PRIVATE_KEY}
                    found = [self._attributes(o, _COMMON) for o in session.get_objects(search)]
                    return key in self._object_keys(found)
            except p11x.GeneralError:
                if attempt + 1 < SCAN_ATTEMPTS:
                    time.sleep(SCAN_RETRY_S)
            except (p11x.PKCS11Error, KeyError):
                return False
        return False

    # --- Token: the rest -----------------------------------------------------------------

    def exclusive(self) -> contextlib.AbstractContextManager[None]:
        return self._rw.exclusive()

    def close(self) -> None:
        """Log the module out and close our sessions (the instance is over)."""
        if self._closed:
            return
        self._closed = True
        lib = self._library
        # The module's login is per process: an instance that closes late (it was stuck in
        # a hung module) must not log out the instance that has replaced it.
        if self._control is not None and lib.latest_instance(self._slot.slot_id) == (
            self._generation
        ):
            with contextlib.suppress(Exception):
                lib.logout(self._control.handle)
        for session in [w.session for w in self._all_workers] + [self._control]:
            if session is not None:
                with contextlib.suppress(Exception), lib.guard():
                    session.close()
        self._all_workers.clear()
        lib.release()
        # Only now (the module logged out, our sessions closed) may a new instance start.
        self._slot.forget(self._slot.reader, self._slot.arrival)


def _stable_keys(
    objects: Sequence[dict[CKA, AttributeValue]],
) -> list[tuple[str, dict[CKA, AttributeValue]]]:
    """Name objects by what they are, not by module handle: modules renumber private
    objects at every login (SoftHSM2 forgets their handles at C_Logout), while the session
    engine's handles must stay put for a token instance. Class, CKA_ID and label, plus a
    counter for look-alikes, in the module's order."""
    seen: dict[str, int] = {}
    out = []
    for attrs in objects:
        cls = attrs.get(CKA.CKA_CLASS)
        key_id = attrs.get(CKA.CKA_ID)
        base = "{}:{}:{}".format(
            int(cls) if isinstance(cls, int) else "?",
            key_id.hex() if isinstance(key_id, bytes) else "",
            attrs.get(CKA.CKA_LABEL) or "",
        )
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.append((f"{base}#{n}", attrs))
    return out


def _mechanism(mechanism: Mechanism) -> tuple[Any, Any]:
    """tokend's mechanism value → python-pkcs11's (mechanism, parameter)."""
    try:
        mech = pkcs11.Mechanism(int(mechanism.mechanism))
    except ValueError:
        raise MechanismParamInvalidError(f"{mechanism.mechanism.name} unknown") from None
    params = mechanism.params
    if isinstance(params, OaepParams):
        return mech, (
            pkcs11.Mechanism(int(params.hash_alg)),
            pkcs11.MGF(int(params.mgf)),
            params.source_data or None,
        )
    if isinstance(params, PssParams):
        return mech, (
            pkcs11.Mechanism(int(params.hash_alg)),
            pkcs11.MGF(int(params.mgf)),
            int(params.s_len),
        )
    return mech, None


def _raw_mechanism(mechanism: Mechanism) -> tuple[_CkMechanism, object]:
    """tokend's mechanism value → a CK_MECHANISM for the function list, and the parameter
    structure it points to (keep it alive as long as the mechanism)."""
    params = mechanism.params
    param: ctypes.Structure | None = None
    source = None
    if isinstance(params, OaepParams):
        source = ctypes.create_string_buffer(params.source_data, max(1, len(params.source_data)))
        param = _CkOaepParams(
            int(params.hash_alg),
            int(params.mgf),
            CKZ_DATA_SPECIFIED,
            ctypes.addressof(source) if params.source_data else None,
            len(params.source_data),
        )
    elif isinstance(params, PssParams):
        param = _CkPssParams(int(params.hash_alg), int(params.mgf), int(params.s_len))
    elif params is not None:
        raise MechanismParamInvalidError(f"{mechanism.mechanism.name}: unexpected parameters")
    mech = _CkMechanism(
        int(mechanism.mechanism),
        ctypes.addressof(param) if param is not None else None,
        ctypes.sizeof(param) if param is not None else 0,
    )
    return mech, (param, source)


def module_configs(paths: Sequence[str], tables: Sequence[dict[str, Any]]) -> list[ModuleConfig]:
    """Configuration entries first, then ``--module`` paths; labels must be unique (they
    name the slots)."""
    configs = [ModuleConfig.from_table(t) for t in tables]
    configs += [ModuleConfig.from_path(p) for p in paths]
    seen: set[str] = set()
    for cfg in configs:
        if cfg.label in seen:
            raise ValueError(f"two modules are labelled {cfg.label!r}: give one a label")
        seen.add(cfg.label)
    return configs


__all__ = [
    "CALL_TIMEOUT_S",
    "POLL_INTERVAL_S",
    "ModuleConfig",
    "ModuleLibrary",
    "ModuleSlot",
    "ModuleToken",
    "ModuleWatcher",
    "module_configs",
]

# The process may fork (tests start services): a module's state does not survive a fork.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=lambda: _LOADED.clear())
