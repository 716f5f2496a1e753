"""Provisioning through the daemon: PIN/PUK/management key, key generation and import,
certificates, retiring keys, reset (docs/provisioning.md).

Session layer. Tokens offer provisioning by duck typing (`tokend.model.Provisionable`); a
token without a method answers CKR_FUNCTION_NOT_SUPPORTED. Rules kept here:

* Every card call goes through the engine (`Engine._card` → `TokenInstance.run`), so the
  disconnect rule applies and a provisioning call can never reach a token inserted after
  the session was opened.
* Changes need a read/write session, and — except PIN/PUK management and reset, which
  prove themselves — an application logged in with the PIN: the management key is often
  left at its well-known default, so the PIN is what shows the user is there.
* Management-key authentication and the change it allows run in one exclusive section,
  followed by a re-read of the token; object handles of touched slots are forgotten, so a
  client holding the old key's handle gets CKR_OBJECT_HANDLE_INVALID, never the new key.
* Secrets (PIN, PUK, management keys, private keys) arrive as bytearrays, are wiped after
  use and never logged.
"""

from __future__ import annotations

import datetime as dt
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tokend.consent import Use
from tokend.errors import (
    ArgumentsBadError,
    AttributeValueInvalidError,
    DeviceMemoryError,
    FunctionFailedError,
    FunctionNotSupportedError,
    KeySizeRangeError,
    PinIncorrectError,
    PinLockedError,
    SessionReadOnlyError,
    TemplateInconsistentError,
    TokendError,
    UserNotLoggedInError,
)
from tokend.model import (
    ObjectKey,
    ObjectKind,
    Provisionable,
    ProvisioningProfile,
    TokenObject,
    TokenStatus,
)
from tokend.pkcs11 import CKA
from tokend.session import Application, Engine, Session
from tokend.wipe import wipe

log = logging.getLogger(__name__)
T = TypeVar("T")


def slot_name(slot: int) -> str:
    return f"{slot:02x}"


def _choose(table: Mapping[str, T], value: str | None, what: str) -> T | None:
    if value is None:
        return None
    try:
        return table[value.lower()]
    except KeyError:
        raise ArgumentsBadError(f"unknown {what} {value!r} ({', '.join(table)})") from None


class CredentialError(PinIncorrectError):  # type: ignore[misc]
    """A wrong PIN, PUK or management key; ``credential`` says which (sent in ``data``)."""

    def __init__(self, message: str, *, credential: str, retries: int | None = None) -> None:
        super().__init__(message, retries=retries)
        self.credential = credential

    def data(self) -> dict[str, object]:
        return {"retries": self.retries, "credential": self.credential}


class CredentialLockedError(PinLockedError):  # type: ignore[misc]
    """The PIN or the PUK is blocked; ``credential`` says which."""

    def __init__(self, message: str, *, credential: str) -> None:
        super().__init__(message)
        self.credential = credential

    def data(self) -> dict[str, object]:
        return {**super().data(), "credential": self.credential}


def _relabel(exc: TokendError, credential: str) -> TokendError:
    if isinstance(exc, PinLockedError):
        return CredentialLockedError(f"{credential.upper()} blocked", credential=credential)
    if isinstance(exc, PinIncorrectError):
        retries = getattr(exc, "retries", None)
        what = "management key" if credential == "management_key" else credential.upper()
        text = f"{what} incorrect" + (f", {retries} tries left" if retries is not None else "")
        return CredentialError(text, credential=credential, retries=retries)
    return exc


# --- values handed to the API layer --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SlotUsage:
    slot: str
    sign: bool
    decrypt: bool
    always_authenticate: bool
    #: CKA_ID of the slot's key (tools find its objects by it; a SIM's IDs are per key)
    key_id: bytes = b""


@dataclass(frozen=True, slots=True)
class StatusView:
    status: TokenStatus
    usage: Sequence[SlotUsage]
    generation: int


@dataclass(frozen=True, slots=True)
class RenewResult:
    retired_slot: str | None  # where the old key went; None if the slot was empty


# --- key material checks (before the token is touched) -------------------------------------


PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey


def load_private_key(der: bytearray, profile: ProvisioningProfile) -> PrivateKey:
    """PKCS#8 (or traditional) DER; refuses key types the token kind cannot hold."""
    try:
        key = serialization.load_der_private_key(bytes(der), password=None)
    except (ValueError, TypeError):
        raise ArgumentsBadError("private_key is not an unencrypted DER private key") from None
    finally:
        wipe(der)
    check_supported(key, profile)
    return key  # type: ignore[return-value]


def check_supported(key: object, profile: ProvisioningProfile) -> None:
    sizes = f"{min(profile.rsa_sizes)}-{max(profile.rsa_sizes)}" if profile.rsa_sizes else "none"
    curves = ", ".join(_CURVE_NAMES.get(c, c) for c in profile.ec_curves)
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size not in profile.rsa_sizes:
            raise KeySizeRangeError(f"RSA-{key.key_size} keys are not supported ({sizes})")
        if key.public_key().public_numbers().e != 65537:
            raise KeySizeRangeError("RSA keys need the public exponent 65537")
        return
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if key.curve.name not in profile.ec_curves:
            raise KeySizeRangeError(f"EC curve {key.curve.name} is not supported ({curves})")
        return
    raise AttributeValueInvalidError(
        f"{type(key).__name__.lstrip('_')} keys are not supported (RSA or EC {curves})"
    )


_CURVE_NAMES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def load_certificate(der: bytes) -> x509.Certificate:
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError:
        raise ArgumentsBadError("certificate is not a DER X.509 certificate") from None


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined,no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def check_match(private_key: PrivateKey, cert: x509.Certificate) -> None:
    if _spki(private_key.public_key()) != _spki(cert.public_key()):
        raise TemplateInconsistentError("the private key does not match the certificate")


# --- the provisioning service --------------------------------------------------------------


class Provisioning:
    """Provisioning calls for one engine. Each public coroutine is one API method."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    # -- plumbing --

    def _target(
        self, app: Application, handle: int, *, write: bool = True, login: bool = True
    ) -> tuple[Session, Provisionable]:
        session = self.engine.session(app, handle)
        if write and not session.rw:
            raise SessionReadOnlyError("open a read/write session (CKF_RW_SESSION) to provision")
        if login and session.instance.key not in app.logins:
            raise UserNotLoggedInError("log in with the PIN first: provisioning changes keys")
        return session, session.instance.token  # type: ignore[return-value]

    @staticmethod
    def _require(token: object, *names: str) -> None:
        for name in names:
            if not callable(getattr(token, name, None)):
                raise FunctionNotSupportedError(f"this token cannot {name.replace('_', ' ')}")

    async def _card(self, session: Session, fn: Callable[[], T]) -> T:
        # Every provisioning call reaches the card here: the per-program policy decides first.
        await self.engine.authorize(session.app, session.instance, Use.PROVISION)
        return await self.engine.run_on_card(session, fn)  # type: ignore[no-any-return]

    def _forget(self, session: Session, *slots: int) -> None:
        """Drop the object handles of touched key slots: the objects were replaced."""
        self.engine.forget_objects(session.instance, slots)

    @staticmethod
    def _profile(token: object) -> ProvisioningProfile:
        profile = getattr(token, "profile", None)
        if not isinstance(profile, ProvisioningProfile):
            raise FunctionNotSupportedError("this token cannot be provisioned")
        return profile

    def key_slot(self, app: Application, handle: int, name: str | None) -> int:
        """The key slot ``name`` means on the session's token (its profile's names, hex,
        "retiredN"); None: the token's encryption slot."""
        token = self.engine.session(app, handle).instance.token
        profile = self._profile(token)
        if name is None:
            return profile.encryption_slot
        try:
            return profile.parse_key_slot(name)
        except ValueError as exc:
            raise ArgumentsBadError(str(exc)) from None

    @classmethod
    def _authenticate(cls, token: Provisionable, management_key: bytearray | None) -> None:
        default = cls._profile(token).default_admin_key
        key = bytes(management_key) if management_key is not None else default
        if key is None:
            raise ArgumentsBadError(f"give the {cls._profile(token).admin_credential}")
        try:
            token.authenticate_management_key(key)
        except TokendError as exc:
            raise _relabel(exc, "management_key") from None

    async def _managed(
        self,
        session: Session,
        token: Provisionable,
        management_key: bytearray | None,
        work: Callable[[], T],
        touched: Sequence[int],
    ) -> T:
        """Authenticate with the management key and do ``work`` in one exclusive section,
        then re-read the token."""

        def run() -> T:
            with token.exclusive():  # type: ignore[attr-defined]
                try:
                    self._authenticate(token, management_key)
                    return work()
                finally:
                    token.refresh()

        try:
            return await self._card(session, run)
        finally:
            wipe(management_key)
            self._forget(session, *touched)

    # -- read --

    async def status(self, slot_id: int) -> StatusView:
        instance = self.engine.registry.instance(slot_id)
        token = instance.token
        self._require(token, "status")
        status: TokenStatus = await instance.run(token.status)  # type: ignore[attr-defined]
        usage = [_usage(obj) for obj in token.objects() if obj.key.kind is ObjectKind.PRIVATE_KEY]
        return StatusView(status, tuple(usage), instance.generation)

    # -- PIN, PUK, management key --

    async def change_pin(
        self, app: Application, handle: int, old: bytearray, new: bytearray
    ) -> None:
        await self._reference(app, handle, "change_pin", old, new, "pin")

    async def change_puk(
        self, app: Application, handle: int, old: bytearray, new: bytearray
    ) -> None:
        await self._reference(app, handle, "change_puk", old, new, "puk")

    async def unblock_pin(
        self, app: Application, handle: int, puk: bytearray, new: bytearray
    ) -> None:
        await self._reference(app, handle, "unblock_pin", puk, new, "puk")

    async def _reference(
        self,
        app: Application,
        handle: int,
        name: str,
        first: bytearray,
        second: bytearray,
        credential: str,
    ) -> None:
        try:
            session, token = self._target(app, handle, login=False)
            self._require(token, name)
            instance = session.instance
            async with self.engine.login_lock(instance):
                try:
                    await self._card(session, lambda: getattr(token, name)(first, second))
                except (PinIncorrectError, PinLockedError) as exc:
                    raise _relabel(exc, credential) from None
                if name != "change_puk" and not any(
                    instance.key in other.logins for other in self.engine.apps.values()
                ):
                    # Some cards leave the PIN verified after CHANGE REFERENCE DATA or
                    # RESET RETRY COUNTER; with no application logged in, nothing may stay
                    # verified (the card's state is global, logins are per application).
                    await self._card(session, token.logout)
        finally:
            wipe(first)
            wipe(second)

    async def set_management_key(
        self,
        app: Application,
        handle: int,
        current: bytearray | None,
        new: bytearray,
        algorithm: str = "tdes",
        require_touch: bool = False,
    ) -> None:
        try:
            session, token = self._target(app, handle)
            self._require(token, "set_management_key", "authenticate_management_key")
            table = self._profile(token).admin_algorithms
            alg, length = table.get(algorithm.lower(), (None, 0))
            if alg is None:
                raise ArgumentsBadError(f"unknown management key algorithm {algorithm!r}")
            if len(new) != length:
                raise ArgumentsBadError(f"a {algorithm} management key is {length} bytes")
        except BaseException:
            wipe(current)
            wipe(new)
            raise

        def work() -> None:
            token.set_management_key(bytes(new), alg, require_touch=require_touch)

        try:
            await self._managed(session, token, current, work, ())
        finally:
            wipe(new)

    # -- keys and certificates --

    async def generate_key(
        self,
        app: Application,
        handle: int,
        slot: int,
        algorithm: str,
        management_key: bytearray | None,
        pin_policy: str | None = None,
        touch_policy: str | None = None,
    ) -> bytes:
        """Generate a key pair on the token; returns the public key (SPKI DER). The slot's
        old certificate belonged to the old key and is deleted."""
        try:
            session, token = self._target(app, handle)
            self._require(token, "generate_key", "authenticate_management_key")
            profile = self._profile(token)
            alg = _choose(profile.algorithms, algorithm, "algorithm")
            pin = _choose(profile.pin_policies, pin_policy, "PIN policy")
            touch = _choose(profile.touch_policies, touch_policy, "touch policy")
        except BaseException:
            wipe(management_key)
            raise
        had_cert = _has_certificate(token, slot)

        def work() -> bytes:
            public = token.generate_key(slot, alg, pin, touch)  # type: ignore[arg-type]
            if had_cert:
                token.delete_certificate(slot)
            return _spki(public)

        log.info("generating %s key in slot %02X", algorithm, slot)
        return await self._managed(session, token, management_key, work, (slot,))

    async def import_key(
        self,
        app: Application,
        handle: int,
        slot: int,
        private_key: bytearray,
        certificate: bytes | None,
        management_key: bytearray | None,
        pin_policy: str | None = None,
        touch_policy: str | None = None,
    ) -> None:
        """Import a private key (and its certificate, checked to match) into ``slot``."""
        try:
            session, token = self._target(app, handle)
            self._require(token, "import_key", "authenticate_management_key", "put_certificate")
            profile = self._profile(token)
            pin = _choose(profile.pin_policies, pin_policy, "PIN policy")
            touch = _choose(profile.touch_policies, touch_policy, "touch policy")
            key = load_private_key(private_key, profile)
            cert = load_certificate(certificate) if certificate is not None else None
            if cert is not None:
                check_match(key, cert)
        except BaseException:
            wipe(private_key)
            wipe(management_key)
            raise
        had_cert = _has_certificate(token, slot)

        def work() -> None:
            token.import_key(slot, key, pin, touch)  # type: ignore[arg-type]
            if certificate is not None:
                token.put_certificate(slot, certificate)
            elif had_cert:
                token.delete_certificate(slot)

        await self._managed(session, token, management_key, work, (slot,))

    async def put_certificate(
        self,
        app: Application,
        handle: int,
        slot: int,
        certificate: bytes,
        management_key: bytearray | None,
        force: bool = False,
    ) -> None:
        """Write a certificate; refused if it does not fit the key in the slot (unless
        ``force``) — a mail client would otherwise sign with a key the certificate denies."""
        try:
            session, token = self._target(app, handle)
            self._require(token, "put_certificate", "authenticate_management_key")
            cert = load_certificate(certificate)
            current = _public_key_info(token, slot)
            if current is not None and current != _spki(cert.public_key()) and not force:
                raise TemplateInconsistentError(
                    f"the certificate does not match the key in slot {slot_name(slot)}"
                )
        except BaseException:
            wipe(management_key)
            raise
        await self._managed(
            session,
            token,
            management_key,
            lambda: token.put_certificate(slot, certificate),
            (slot,),
        )

    async def delete_key(
        self,
        app: Application,
        handle: int,
        slot: int,
        management_key: bytearray | None,
        keep_certificate: bool = False,
    ) -> None:
        try:
            session, token = self._target(app, handle)
            self._require(token, "move_key", "delete_certificate", "authenticate_management_key")
            has_key = _public_key_info(token, slot) is not None
            has_cert = _has_certificate(token, slot)
            if not has_key and not has_cert:
                raise FunctionFailedError(f"slot {slot_name(slot)} is empty")
        except BaseException:
            wipe(management_key)
            raise

        def work() -> None:
            if has_key:
                token.move_key(
                    slot, self._profile(token).delete_ref, with_certificate=not keep_certificate
                )
            elif not keep_certificate:
                token.delete_certificate(slot)

        await self._managed(session, token, management_key, work, (slot,))

    async def move_key(
        self,
        app: Application,
        handle: int,
        src: int,
        dst: int,
        management_key: bytearray | None,
    ) -> None:
        try:
            session, token = self._target(app, handle)
            self._require(token, "move_key", "authenticate_management_key")
            if _public_key_info(token, src) is None:
                raise FunctionFailedError(f"slot {slot_name(src)} holds no key")
            if _populated(token, dst):
                raise FunctionFailedError(f"slot {slot_name(dst)} is not empty")
        except BaseException:
            wipe(management_key)
            raise
        await self._managed(
            session, token, management_key, lambda: token.move_key(src, dst), (src, dst)
        )

    async def renew_key(
        self,
        app: Application,
        handle: int,
        slot: int,
        private_key: bytearray,
        certificate: bytes,
        management_key: bytearray | None,
    ) -> RenewResult:
        """Move the key and certificate in ``slot`` (9D) to the first free retired slot and
        import the new ones there. Everything is checked before the token is touched; if the
        import fails the old key is moved back."""
        try:
            session, token = self._target(app, handle)
            self._require(
                token, "move_key", "import_key", "put_certificate", "authenticate_management_key"
            )
            key = load_private_key(private_key, self._profile(token))
            cert = load_certificate(certificate)
            check_match(key, cert)
            _retired_target(token, slot)  # refuse early when all retired slots are in use
        except BaseException:
            wipe(private_key)
            wipe(management_key)
            raise
        moved: list[int] = []

        def work() -> None:
            # Decided again here, inside the exclusive section: another client may have
            # changed the token since the check above.
            target = _retired_target(token, slot)
            if target is not None:
                token.move_key(slot, target)
                moved.append(target)
            try:
                token.import_key(slot, key)
                token.put_certificate(slot, certificate)
            except BaseException:
                if target is not None:
                    _rollback(token, slot, target)
                raise

        try:
            await self._managed(session, token, management_key, work, (slot,))
        finally:
            self._forget(session, *moved)
        return RenewResult(slot_name(moved[0]) if moved else None)

    async def reset(self, app: Application, handle: int) -> None:
        """Factory reset; refused unless PIN and PUK are both blocked (the user confirmed
        that every key is to be lost)."""
        session, token = self._target(app, handle, login=False)
        self._require(token, "reset", "pin_status")

        def run() -> None:
            with token.exclusive():  # type: ignore[attr-defined]
                pins = token.pin_status()  # type: ignore[attr-defined]
                if pins.pin_retries != 0 or pins.puk_retries not in (0, None):
                    raise FunctionFailedError(
                        "PIN and PUK are not both blocked; the token is reset only then"
                    )
                try:
                    token.reset()
                finally:
                    token.refresh()

        try:
            await self._card(session, run)
        finally:
            self._forget(session)
            self.engine.lost_card_login(session.instance)


def _retired_target(token: object, slot: int) -> int | None:
    """The first free retired slot for the key now in ``slot`` (None: ``slot`` is empty)."""
    if _public_key_info(token, slot) is None:
        return None
    pool = Provisioning._profile(token).retired_slots
    for candidate in pool:
        if not _populated(token, candidate):
            return candidate
    if not pool:
        raise FunctionNotSupportedError("this token keeps no retired keys")
    first, last = slot_name(pool[0]), slot_name(pool[-1])
    raise DeviceMemoryError(
        f"all {len(pool)} retired key slots ({first}-{last}) are in use; free some first"
    )


def _rollback(token: Provisionable, slot: int, target: int) -> None:
    """Best effort: put the old key back where it was."""
    try:
        token.refresh()
        if _public_key_info(token, slot) is not None:
            token.move_key(slot, Provisioning._profile(token).delete_ref)
        token.move_key(target, slot)
    except Exception:
        log.error("renewal failed and the old key stays in slot %02X", target)


def _objects(token: object) -> Sequence[TokenObject]:
    return token.objects()  # type: ignore[attr-defined,no-any-return]


def _public_key_info(token: object, slot: int) -> bytes | None:
    for obj in _objects(token):
        if obj.key == ObjectKey(ObjectKind.PUBLIC_KEY, slot):
            value = obj.attributes.get(CKA.CKA_PUBLIC_KEY_INFO)
            return value if isinstance(value, bytes) else b""
    return None


def _has_certificate(token: object, slot: int) -> bool:
    return ObjectKey(ObjectKind.CERTIFICATE, slot) in {obj.key for obj in _objects(token)}


def _populated(token: object, slot: int) -> bool:
    return any(obj.key.ref == slot for obj in _objects(token))


def _usage(obj: TokenObject) -> SlotUsage:
    a = obj.attributes
    return SlotUsage(
        slot=slot_name(obj.key.ref),
        sign=bool(a.get(CKA.CKA_SIGN)),
        decrypt=bool(a.get(CKA.CKA_DECRYPT) or a.get(CKA.CKA_DERIVE)),
        always_authenticate=bool(a.get(CKA.CKA_ALWAYS_AUTHENTICATE)),
        key_id=bytes(a.get(CKA.CKA_ID) or b""),  # type: ignore[arg-type]
    )


def days_left(cert: x509.Certificate, now: dt.datetime | None = None) -> int:
    now = now or dt.datetime.now(dt.UTC)
    return (cert.not_valid_after_utc - now).days
