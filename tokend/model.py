"""The token model: values and the `Token` seam that applet drivers (and the vendor-module
backend) implement and the session layer consumes. Pure: no I/O here.

Vocabulary: a *slot* is where a token can be (a reader); a *key slot* is where a key lives
on a token (PIV key reference, PKCS#15 key reference); a *token* is what is present now
(one instance per insertion); a *session* is a PKCS#11 session; a *client* is a socket
peer.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from enum import Enum
from typing import Protocol, runtime_checkable

from tokend.pkcs11 import CKA, CKD, CKF_MECH, CKF_TOKEN, CKG, CKM

AttributeValue = bool | int | bytes | str | None


@dataclass(frozen=True, slots=True)
class TokenIdentity:
    """What makes one physical token distinguishable from another (§5.1 identity check)."""

    applet: str  # "PIV", "SIM-PKI", "PKCS11-MODULE"
    serial: str  # stable per token: CHUID GUID, PKCS#15 serial, module token serial
    atr: bytes = b""


@dataclass(frozen=True, slots=True)
class TokenInfo:
    label: str
    manufacturer_id: str
    model: str
    serial_number: str
    flags: CKF_TOKEN = CKF_TOKEN.CKF_LOGIN_REQUIRED | CKF_TOKEN.CKF_USER_PIN_INITIALIZED
    hardware_version: tuple[int, int] = (1, 0)
    firmware_version: tuple[int, int] = (1, 0)
    min_pin_len: int = 6
    max_pin_len: int = 8


@dataclass(frozen=True, slots=True)
class MechanismInfo:
    mechanism: CKM
    min_key_size: int
    max_key_size: int
    flags: CKF_MECH


class ObjectKind(Enum):
    """Which of the three objects of a key pair with its certificate."""

    CERTIFICATE = "cert"
    PUBLIC_KEY = "pub"
    PRIVATE_KEY = "priv"


@dataclass(frozen=True, slots=True)
class ObjectKey:
    """Names one token object within a token instance: its kind and the applet's own key
    reference (PIV key slot 9D, a PKCS#15 key reference …). A value, so callers compare
    and hash it instead of building and splitting strings; ``str()`` gives the short form
    (``"priv:9d"``) used in messages and accepted by `parse`."""

    kind: ObjectKind
    ref: int

    def __str__(self) -> str:
        return f"{self.kind.value}:{self.ref:02x}"

    @classmethod
    def parse(cls, text: str) -> ObjectKey:
        """``"priv:9d"`` → ObjectKey; ValueError for anything else."""
        kind, sep, ref = text.partition(":")
        if not sep or not ref:
            raise ValueError(f"not an object key: {text!r}")
        return cls(ObjectKind(kind), int(ref, 16))

    @classmethod
    def of(cls, key: ObjectKey | str) -> ObjectKey:
        """Accept a value or its short text form (tests and tools write ``"priv:9d"``)."""
        return key if isinstance(key, ObjectKey) else cls.parse(key)


@dataclass(frozen=True, slots=True)
class TokenObject:
    """One PKCS#11 object the token exposes. ``key`` is stable within a token instance
    and is what drivers are handed back for operations."""

    key: ObjectKey
    attributes: Mapping[CKA, AttributeValue]

    def matches(self, template: Mapping[CKA, AttributeValue]) -> bool:
        return all(self.attributes.get(k, _MISSING) == v for k, v in template.items())


_MISSING = object()


@dataclass(frozen=True, slots=True)
class PinStatus:
    """Retries left for the user PIN and the PUK; None where the token does not say."""

    pin_retries: int | None
    puk_retries: int | None = None


# --- mechanism parameters (frozen values, decoded by the protocol layer) -------------------


@dataclass(frozen=True, slots=True)
class OaepParams:
    hash_alg: CKM = CKM.CKM_SHA_1
    mgf: CKG = CKG.CKG_MGF1_SHA1
    source_data: bytes = b""


@dataclass(frozen=True, slots=True)
class PssParams:
    hash_alg: CKM = CKM.CKM_SHA256
    mgf: CKG = CKG.CKG_MGF1_SHA256
    s_len: int = 32


@dataclass(frozen=True, slots=True)
class Ecdh1DeriveParams:
    kdf: CKD
    public_data: bytes
    shared_data: bytes = b""


MechanismParams = OaepParams | PssParams | Ecdh1DeriveParams | None


@dataclass(frozen=True, slots=True)
class Mechanism:
    mechanism: CKM
    params: MechanismParams = None


# --- provisioning values -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class KeySlotInfo:
    """What `tokenctl status` shows for one key slot of a token."""

    slot: str  # applet's own name, e.g. "9d" or "82"
    role: str  # "authentication", "signature", "encryption", "card-auth", "retired"
    algorithm: str | None  # "rsa2048", "p256", ... None if empty/unknown
    certificate: bytes | None  # DER
    origin: str | None = None  # "generated", "imported", None if unknown


@dataclass(frozen=True, slots=True)
class TokenStatus:
    identity: TokenIdentity
    info: TokenInfo
    pin: PinStatus
    slots: Sequence[KeySlotInfo] = field(default_factory=tuple)
    version: str | None = None


@dataclass(frozen=True, slots=True)
class ProvisioningProfile:
    """What the generic provisioning layer (`tokend.provisioning`, `tokenctl`) needs to know
    about one token kind, supplied by its driver (`Provisionable.profile`) so the generic
    layer holds no applet tables. Numbers are the applet's own (PIV: key references and
    SP 800-78-4 algorithm identifiers; a PKCS#15 token: key references and its own ids).
    """

    applet: str
    #: every key reference keys can live in, in display order
    key_slots: tuple[int, ...]
    #: names users type for key slots ("sign", "encrypt" …)
    key_slot_names: Mapping[str, int]
    #: where renewed encryption keys go (in order), empty when the token keeps none
    retired_slots: tuple[int, ...]
    encryption_slot: int
    signature_slot: int
    #: the ``dst`` of `Provisionable.move_key` that deletes the key instead
    delete_ref: int
    #: asymmetric algorithms by name ("rsa2048", "p256")
    algorithms: Mapping[str, int]
    #: what a private key must be to go on the token
    rsa_sizes: tuple[int, ...]
    ec_curves: tuple[str, ...]  # `cryptography` curve names
    #: the administrator's credential: a management key (PIV) or an SO PIN (PKCS#15)
    admin_credential: str
    #: admin-key algorithms by name → (applet id, key length)
    admin_algorithms: Mapping[str, tuple[int, int]]
    #: the credential a token ships with, used when the caller gives none
    default_admin_key: bytes | None
    pin_policies: Mapping[str, int] = field(default_factory=dict)
    touch_policies: Mapping[str, int] = field(default_factory=dict)
    #: how valid key slots are described in an error message
    slot_hint: str = ""
    #: the CKA_ID the token gives the key in each key slot
    key_ids: Mapping[int, bytes] = field(default_factory=dict)

    def slot_of_key_id(self, key_id: bytes) -> int | None:
        """The key slot whose objects carry CKA_ID ``key_id``, or None."""
        for ref, value in self.key_ids.items():
            if value == key_id:
                return ref
        return None

    def parse_key_slot(self, name: str) -> int:
        """A key slot from its name, "retiredN" (1-based) or hex; ValueError otherwise."""
        text = name.strip().lower()
        if text in self.key_slot_names:
            return self.key_slot_names[text]
        number = text[7:]
        pool = self.retired_slots
        if text.startswith("retired") and number.isdigit() and 1 <= int(number) <= len(pool):
            return pool[int(number) - 1]
        try:
            value = int(text, 16)
        except ValueError:
            value = -1
        if value not in self.key_slots:
            raise ValueError(f"unknown key slot {name!r} ({self.slot_hint})")
        return value

    @staticmethod
    def slot_name(ref: int) -> str:
        return f"{ref:02x}"


# --- the seam ------------------------------------------------------------------------------


@runtime_checkable
class Token(Protocol):
    """A token as the session layer sees it. All methods block (they do card I/O) and are
    called off the event loop, one at a time per token. Errors are `tokend.errors` classes:
    a `TransportError` means the token is gone (the disconnect rule takes over); a
    `CardResetError` means another program reset the card and its login is lost.

    PIN arguments are ``bytearray`` so the caller can wipe them; drivers must not keep them
    beyond the call.
    """

    @property
    def identity(self) -> TokenIdentity: ...

    @property
    def info(self) -> TokenInfo: ...

    def mechanisms(self) -> Sequence[MechanismInfo]: ...

    def objects(self) -> Sequence[TokenObject]:
        """Objects as read when the token arrived (cached per instance; public data only)."""
        ...

    def pin_status(self) -> PinStatus: ...

    def login(self, pin: bytearray) -> None:
        """VERIFY the user PIN. Raises PinIncorrectError(retries=…)/PinLockedError."""
        ...

    def logout(self) -> None:
        """Reset the card's security state (PIV: VERIFY P1=FF)."""
        ...

    def decrypt(
        self,
        key: ObjectKey,
        mechanism: Mechanism,
        data: bytes,
        *,
        context_pin: bytearray | None = None,
    ) -> bytes:
        """Decrypt; ``context_pin`` as for `sign`."""
        ...

    def sign(
        self,
        key: ObjectKey,
        mechanism: Mechanism,
        data: bytes,
        *,
        context_pin: bytearray | None = None,
    ) -> bytes:
        """Sign; for always-authenticate keys ``context_pin`` is verified in the same
        exclusive section immediately before the operation."""
        ...

    def derive(self, key: ObjectKey, mechanism: Mechanism) -> bytes:
        """Key agreement (ECDH): returns the raw shared secret (after the KDF if asked)."""
        ...

    def exclusive(self) -> AbstractContextManager[None]:
        """An exclusive section (a PC/SC transaction) for multi-command sequences."""
        ...

    def close(self) -> None: ...


@runtime_checkable
class Provisionable(Protocol):
    """The optional provisioning side of a token (PIV today). The session layer finds these
    methods by duck typing; a token without them answers CKR_FUNCTION_NOT_SUPPORTED.

    Slots and algorithms are the applet's own numbers (PIV: key references 9A/9C/9D/9E,
    82-95; SP 800-78-4 algorithm identifiers). Secrets are ``bytearray`` and wiped by the
    caller; every method blocks and runs inside the token's executor."""

    @property
    def profile(self) -> ProvisioningProfile:
        """The token kind's key slots, algorithms and admin credential."""
        ...

    def status(self) -> TokenStatus: ...

    def refresh(self) -> None: ...

    def authenticate_management_key(self, key: bytes) -> None: ...

    def generate_key(
        self, slot: int, alg: int, pin_policy: int | None = None, touch_policy: int | None = None
    ) -> object:
        """Returns the new public key (a `cryptography` public key object)."""
        ...

    def import_key(
        self,
        slot: int,
        private_key: object,
        pin_policy: int | None = None,
        touch_policy: int | None = None,
    ) -> None: ...

    def put_certificate(self, slot: int, der: bytes) -> None: ...

    def delete_certificate(self, slot: int) -> None: ...

    def move_key(self, src: int, dst: int, *, with_certificate: bool = True) -> None:
        """``dst`` 0xFF deletes the key (and its certificate)."""
        ...

    def change_pin(self, old: bytearray, new: bytearray) -> None: ...

    def change_puk(self, old: bytearray, new: bytearray) -> None: ...

    def unblock_pin(self, puk: bytearray, new: bytearray) -> None: ...

    def set_management_key(
        self, new_key: bytes, alg: int = 0x03, *, require_touch: bool = False
    ) -> None: ...

    def reset(self) -> None: ...
