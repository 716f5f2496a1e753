"""The keys of every present token, as a mail client sees them through the daemon: their
certificates (public, readable without a PIN), a logged-in session per token when a key is
used, and the token's part of each operation — RSA unwrap (C_Decrypt), the ECDH secret
(C_DeriveKey) and the signature over a digest (C_Sign). Nothing else crosses the socket.

A `Keyring` follows tokens coming and going: it re-lists the present tokens each time it
is asked and notices a new instance (the daemon's per-slot generation), so a token that was
unplugged and plugged in again needs its PIN again — the keyring never keeps one.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from asn1crypto import x509 as ax509

from tokend.client import Client
from tokend.errors import (
    DeviceRemovedError,
    SessionHandleInvalidError,
    SlotIdInvalidError,
    TokenNotPresentError,
    UserAlreadyLoggedInError,
)
from tokend.model import Ecdh1DeriveParams, Mechanism
from tokend.pkcs11 import CKA, CKD, CKM
from tokend.protocol import unb64
from tokend.smime.errors import TokenRemovedError


class NoPrivateKey(Exception):
    """A certificate on the token without a usable private key next to it."""


#: Errors that mean the token left (or was replaced) while we used it.
GONE = (DeviceRemovedError, TokenNotPresentError, SessionHandleInvalidError, SlotIdInvalidError)


@dataclass(frozen=True, slots=True)
class TokenRef:
    slot_id: int
    serial: str
    label: str
    generation: int

    def __str__(self) -> str:
        return f"{self.label.strip() or 'token'} (serial {self.serial})"


@dataclass(frozen=True, slots=True)
class TokenCert:
    """A certificate on a token and the CKA_ID that ties it to its private key."""

    token: TokenRef
    key_id: bytes
    label: str
    certificate: ax509.Certificate

    @property
    def issuer_der(self) -> bytes:
        return bytes(self.certificate["tbs_certificate"]["issuer"].dump())

    @property
    def serial(self) -> int:
        return int(self.certificate.serial_number)

    @property
    def key_identifiers(self) -> tuple[bytes, ...]:
        """The SKI extension and the RFC 5280 method-1 hash (senders use either)."""
        ids = [self.certificate.public_key.sha1]
        if self.certificate.key_identifier is not None:
            ids.insert(0, self.certificate.key_identifier)
        return tuple(ids)


#: Asks for a PIN: (token, context) → PIN. ``context`` is True for the PIN a PIN-always
#: key needs with every single operation.
PinSource = Callable[[TokenRef, bool], str]


@dataclass
class _Present:
    ref: TokenRef
    certs: list[TokenCert]
    session: int | None = None
    logged_in: bool = False
    keys: dict[bytes, tuple[int, bool]] = field(default_factory=dict)  # id → (handle, always)


class Keyring:
    """Keys on the present tokens (all of them, or the one ``slot_id``), through ``client``."""

    def __init__(self, client: Client, pin: PinSource, *, slot_id: int | None = None) -> None:
        self.client = client
        self._pin = pin
        self._only = slot_id
        self._tokens: dict[int, _Present] = {}

    # --- discovery ------------------------------------------------------------------------

    def tokens(self) -> list[TokenRef]:
        """The tokens present now (re-listed on every call)."""
        slots = self.client.slot_list(token_present=True)
        if self._only is not None:
            slots = [s for s in slots if s == self._only]
        seen: dict[int, _Present] = {}
        for slot in slots:
            try:
                info = self.client.token_info(slot)
            except GONE:
                continue
            ref = TokenRef(
                slot, str(info.get("token_serial") or info.get("serial_number") or "?"),
                str(info.get("label") or ""), int(info.get("generation", 0)),
            )  # fmt: skip
            known = self._tokens.get(slot)
            if known is not None and known.ref == ref:
                seen[slot] = known
                continue
            if known is not None:
                self._forget(known)
            try:
                seen[slot] = _Present(ref, self._read_certs(ref))
            except GONE:
                continue
        for slot, gone in self._tokens.items():
            if slot not in seen:
                self._forget(gone)
        self._tokens = seen
        return [p.ref for p in seen.values()]

    def certificates(self, *, refresh: bool = False) -> list[TokenCert]:
        """Every certificate on every present token (current and retired keys alike).
        They are read once per token insertion; ``refresh`` re-reads them (a token
        provisioned meanwhile by another program keeps its instance)."""
        self.tokens()
        if refresh:
            for present in self._tokens.values():
                with contextlib.suppress(*GONE):
                    present.certs = self._read_certs(present.ref)
                present.keys.clear()
        return [c for p in self._tokens.values() for c in p.certs]

    def _read_certs(self, ref: TokenRef) -> list[TokenCert]:
        session = self.client.open_session(ref.slot_id)
        try:
            out = []
            for handle in self.client.find_objects(session, {CKA.CKA_CLASS: "CKO_CERTIFICATE"}):
                attrs = self.client.get_attributes(
                    session, handle, [CKA.CKA_VALUE, CKA.CKA_ID, CKA.CKA_LABEL]
                )
                if not attrs.get("CKA_VALUE") or not attrs.get("CKA_ID"):
                    continue
                try:
                    cert = ax509.Certificate.load(unb64(attrs["CKA_VALUE"]))
                    cert.native  # noqa: B018  (a damaged certificate is skipped, not fatal)
                except ValueError:
                    continue
                label = str(attrs.get("CKA_LABEL") or "")
                out.append(TokenCert(ref, unb64(attrs["CKA_ID"]), label, cert))
            return out
        finally:
            with contextlib.suppress(Exception):
                self.client.close_session(session)

    def _forget(self, present: _Present) -> None:
        if present.session is not None:
            with contextlib.suppress(Exception):
                self.client.close_session(present.session)  # also logs this client out
        present.session = None
        present.logged_in = False
        present.keys.clear()

    def close(self) -> None:
        for present in self._tokens.values():
            self._forget(present)
        self._tokens.clear()

    def __enter__(self) -> Keyring:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- using a key ----------------------------------------------------------------------

    @contextlib.contextmanager
    def _on(self, cert: TokenCert) -> Iterator[_Present]:
        """The token of ``cert``, logged in; token loss becomes `TokenRemovedError`."""
        present = self._tokens.get(cert.token.slot_id)
        try:
            if present is None or present.ref != cert.token:
                raise TokenNotPresentError("the token is not there")
            if present.session is None:
                present.session = self.client.open_session(cert.token.slot_id)
            if not present.logged_in:
                # login is per connection: another part of this client may have done it
                with contextlib.suppress(UserAlreadyLoggedInError):
                    self.client.login(present.session, self._pin(cert.token, False))
                present.logged_in = True
            yield present
        except GONE:
            if present is not None:
                self._forget(present)
                self._tokens.pop(cert.token.slot_id, None)
            raise TokenRemovedError(
                f"the token {cert.token} was removed while it was being used; "
                "nothing was decrypted or signed with it — plug it in and try again"
            ) from None

    def _private_key(self, present: _Present, cert: TokenCert, usage: CKA) -> tuple[int, bool]:
        cached = present.keys.get(cert.key_id)
        if cached is not None:
            return cached
        assert present.session is not None
        handles = self.client.find_objects(
            present.session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_ID: cert.key_id}
        )
        if not handles:
            raise NoPrivateKey(f"no private key for {cert.label or cert.key_id.hex()}")
        attrs = self.client.get_attributes(
            present.session, handles[0], [CKA.CKA_ALWAYS_AUTHENTICATE, usage]
        )
        if attrs.get(usage.name) is False:
            raise NoPrivateKey(f"the key {cert.label} may not be used for {usage.name}")
        found = (handles[0], bool(attrs.get("CKA_ALWAYS_AUTHENTICATE")))
        present.keys[cert.key_id] = found
        return found

    def _context_pin(self, cert: TokenCert, always: bool) -> str | None:
        return self._pin(cert.token, True) if always else None

    def unwrap(self, cert: TokenCert, mechanism: Mechanism, encrypted_key: bytes) -> bytearray:
        """RSA key transport: the token decrypts the wrapped content-encryption key."""
        with self._on(cert) as present:
            handle, always = self._private_key(present, cert, CKA.CKA_DECRYPT)
            assert present.session is not None
            return bytearray(
                self.client.decrypt(
                    present.session,
                    handle,
                    mechanism,
                    encrypted_key,
                    self._context_pin(cert, always),
                )
            )

    def agree(self, cert: TokenCert, peer_point: bytes) -> bytearray:
        """ECDH with the token's key and the sender's ephemeral point: the raw shared
        secret Z (CKD_NULL). The X9.63 KDF runs on the host, so every KDF hash and KEK
        length CMS allows works with every token."""
        with self._on(cert) as present:
            handle, _ = self._private_key(present, cert, CKA.CKA_DERIVE)
            assert present.session is not None
            mech = Mechanism(CKM.CKM_ECDH1_DERIVE, Ecdh1DeriveParams(CKD.CKD_NULL, peer_point))
            return bytearray(self.client.derive(present.session, handle, mech))

    def sign(self, cert: TokenCert, mechanism: Mechanism, data: bytes) -> bytes:
        """The token signs ``data`` (a DigestInfo or a hash; the host did the hashing)."""
        with self._on(cert) as present:
            handle, always = self._private_key(present, cert, CKA.CKA_SIGN)
            assert present.session is not None
            return self.client.sign(
                present.session, handle, mechanism, data, self._context_pin(cert, always)
            )

    def public_key_usage(self, cert: TokenCert) -> dict[str, Any]:
        """CKA_SIGN/CKA_VERIFY … of the public key object next to ``cert`` (no PIN needed)."""
        present = self._tokens.get(cert.token.slot_id)
        if present is None:
            return {}
        try:
            session = self.client.open_session(cert.token.slot_id)
        except GONE:
            return {}
        try:
            handles = self.client.find_objects(
                session, {CKA.CKA_CLASS: "CKO_PUBLIC_KEY", CKA.CKA_ID: cert.key_id}
            )
            if not handles:
                return {}
            return self.client.get_attributes(
                session, handles[0], [CKA.CKA_VERIFY, CKA.CKA_ENCRYPT, CKA.CKA_DERIVE]
            )
        finally:
            with contextlib.suppress(Exception):
                self.client.close_session(session)
