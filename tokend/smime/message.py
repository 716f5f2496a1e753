"""The MIME side of S/MIME (RFC 8551): finding the CMS in a mail message, taking a message
apart into its envelope headers (From, To, Subject…) and the MIME entity that is signed or
encrypted, and putting signed messages together.

Parsing uses the standard `email` package. Writing a signed message does not: the signed
entity must reach the reader byte for byte, and the `email` generator re-folds headers and
re-renders nested parts, so the multipart frame is written here around the exact bytes that
were signed.
"""

from __future__ import annotations

import base64
import email
import email.charset
import email.parser
import email.policy
import re
import secrets
from dataclasses import dataclass
from email.message import Message

from asn1crypto import cms, pem

from tokend.smime.errors import MALFORMED, CorruptMessageError, SmimeError

CRLF = b"\r\n"
_PKCS7_MIME = ("application/pkcs7-mime", "application/x-pkcs7-mime")
_PKCS7_SIGNATURE = ("application/pkcs7-signature", "application/x-pkcs7-signature")
_HEADER_LINE = re.compile(rb"^(?:[!-9;-~]+:|[ \t])")
_POLICY = email.policy.compat32


@dataclass(frozen=True, slots=True)
class Header:
    name: str
    value: str  # as in the source, continuation lines included

    def line(self) -> bytes:
        value = re.sub(r"\r?\n", "\r\n", self.value)
        return f"{self.name}: {value}".encode("utf-8", "surrogateescape")


@dataclass(frozen=True, slots=True)
class Unwrapped:
    """A CMS structure found in the input, with the message's envelope headers (From, To,
    Subject… — everything but Content-* and MIME-Version; empty for bare CMS)."""

    info: cms.ContentInfo
    envelope: tuple[Header, ...]
    #: multipart/signed: the first part exactly as in the input (detached content).
    detached: bytes | None = None


def canonical(data: bytes) -> bytes:
    """Line endings as CRLF (RFC 8551 §3.1.1: what is signed is the canonical form)."""
    return re.sub(rb"\r?\n", CRLF, data)


def load_cms(der: bytes) -> cms.ContentInfo:
    try:
        info = cms.ContentInfo.load(der, strict=False)
        info["content_type"].native  # noqa: B018  (parses now, so corruption shows here)
        info["content"].native  # noqa: B018
    except MALFORMED as exc:
        raise CorruptMessageError(f"corrupt message: not a CMS structure ({exc})") from None
    return info


def _split_header_block(data: bytes) -> tuple[bytes, bytes] | None:
    """(header block, body) if ``data`` starts with RFC 5322 header lines."""
    match = re.search(rb"\r?\n\r?\n", data)
    if match is None:
        head, body = data, b""
    else:
        head, body = data[: match.start()], data[match.end() :]
    lines = re.split(rb"\r?\n", head)
    if not lines or not lines[0] or lines[0][:1] in b" \t":
        return None
    if not all(_HEADER_LINE.match(line) for line in lines):
        return None
    return head, body


def _headers(head: bytes) -> list[Header]:
    msg = email.parser.BytesHeaderParser(policy=_POLICY).parsebytes(head + CRLF + CRLF)
    return [Header(name, str(value)) for name, value in msg.raw_items()]


def _is_mime_header(name: str) -> bool:
    lower = name.lower()
    return lower.startswith("content-") or lower == "mime-version"


def _cms_from_text(data: bytes) -> bytes | None:
    """DER from a bare DER or PEM (PKCS7 / CMS) input; None if it is something else."""
    stripped = data.lstrip()
    if stripped[:1] == b"\x30":
        return stripped
    if pem.detect(stripped):
        try:
            kind, _, der = pem.unarmor(stripped)
        except ValueError as exc:
            raise CorruptMessageError(f"corrupt message: bad PEM ({exc})") from None
        if kind not in ("PKCS7", "CMS"):
            raise CorruptMessageError(f"the input is a PEM {kind}, not a CMS message")
        return bytes(der)
    return None


def _parse_mime(data: bytes) -> tuple[Message, tuple[Header, ...]]:
    split = _split_header_block(data)
    if split is None:
        raise CorruptMessageError(
            "corrupt message: neither a MIME message nor CMS (DER or PEM) data"
        )
    msg = email.message_from_bytes(data, policy=_POLICY)
    envelope = tuple(h for h in _headers(split[0]) if not _is_mime_header(h.name))
    return msg, envelope


def _decode_part(part: Message) -> bytes:
    payload = part.get_payload(decode=True)
    if not isinstance(payload, bytes) or not payload:
        raise CorruptMessageError("corrupt message: the S/MIME part has no body")
    return payload


def unwrap(data: bytes) -> Unwrapped:
    """The CMS structure in ``data``: DER, PEM, an `application/pkcs7-mime` message, or a
    `multipart/signed` message (then ``detached`` holds the signed part)."""
    der = _cms_from_text(data)
    if der is not None:
        return Unwrapped(load_cms(der), ())
    msg, envelope = _parse_mime(data)
    ctype = msg.get_content_type()
    if ctype == "multipart/signed":
        info, detached = _multipart_signed(data, msg)
        return Unwrapped(info, envelope, detached)
    part = next((p for p in msg.walk() if p.get_content_type() in _PKCS7_MIME), None)
    if part is None:
        raise SmimeError(f"not an S/MIME message (it is {ctype}, without application/pkcs7-mime)")
    return Unwrapped(load_cms(_decode_part(part)), envelope)


def _multipart_signed(data: bytes, msg: Message) -> tuple[cms.ContentInfo, bytes]:
    boundary = msg.get_boundary()
    parts = msg.get_payload()
    if not boundary or not isinstance(parts, list) or len(parts) != 2:
        raise CorruptMessageError("corrupt message: multipart/signed needs exactly two parts")
    if parts[1].get_content_type() not in _PKCS7_SIGNATURE:
        raise SmimeError(
            f"the signature part is {parts[1].get_content_type()}, not an S/MIME signature"
        )
    info = load_cms(_decode_part(parts[1]))
    return info, first_part(data, boundary)


def first_part(data: bytes, boundary: str) -> bytes:
    """The first body part of a multipart message, byte for byte: from after the first
    delimiter line to before the line break that opens the next one (RFC 2046 §5.1.1)."""
    b = re.escape(boundary.encode("ascii", "surrogateescape"))
    delimiter = re.compile(rb"(?:\A|\r?\n)--" + b + rb"(?:--)?[ \t]*(?:\r?\n|\Z)")
    found = list(delimiter.finditer(data))
    if len(found) < 2:
        raise CorruptMessageError("corrupt message: the multipart boundaries are missing")
    return data[found[0].end() : found[1].start()]


# --- taking an outgoing message apart --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Outgoing:
    envelope: tuple[Header, ...]
    entity: bytes  # canonical (CRLF) MIME entity: Content-* headers, blank line, body


def outgoing(data: bytes) -> Outgoing:
    """Split a message to be signed into envelope headers and the MIME entity to sign.

    A whole message keeps From/To/Subject… outside the signature (as mail clients do); its
    Content-* headers and body are the entity. Plain text without headers becomes a
    text/plain entity (UTF-8, quoted-printable when it is not ASCII, so transports cannot
    alter what was signed)."""
    text = canonical(data)
    split = _split_header_block(text)
    if split is None:
        return Outgoing((), _text_entity(text))
    head, body = split
    headers = _headers(head)
    envelope = tuple(h for h in headers if not _is_mime_header(h.name))
    content = [h for h in headers if h.name.lower().startswith("content-")]
    if not content:
        return Outgoing(envelope, _text_entity(body))
    return Outgoing(envelope, CRLF.join(h.line() for h in content) + CRLF + CRLF + body)


def _text_entity(body: bytes) -> bytes:
    try:
        body.decode("ascii")
    except UnicodeDecodeError:
        charset = email.charset.Charset("utf-8")
        charset.body_encoding = email.charset.QP
        encoded = charset.body_encode(body.decode("utf-8", "replace")) or ""
        head = (
            b"Content-Type: text/plain; charset=utf-8\r\n"
            b"Content-Transfer-Encoding: quoted-printable\r\n"
        )
        return head + CRLF + canonical(encoded.encode("ascii"))
    return b"Content-Type: text/plain; charset=us-ascii\r\n" + CRLF + body


# --- putting messages together -----------------------------------------------------------------


def _b64_lines(der: bytes) -> bytes:
    text = base64.b64encode(der)
    return CRLF.join(text[i : i + 76] for i in range(0, len(text), 76)) + CRLF


def _envelope_lines(envelope: tuple[Header, ...]) -> bytes:
    return b"".join(h.line() + CRLF for h in envelope)


def multipart_signed(out: Outgoing, signature_der: bytes, micalg: str) -> bytes:
    """RFC 8551 §3.5.3 detached signature: the entity as the first part, the CMS as the
    second (application/pkcs7-signature)."""
    boundary = "----tokend-" + secrets.token_hex(12)
    while boundary.encode() in out.entity:
        boundary = "----tokend-" + secrets.token_hex(12)
    b = boundary.encode()
    return (
        _envelope_lines(out.envelope)
        + b"MIME-Version: 1.0\r\n"
        + b'Content-Type: multipart/signed; protocol="application/pkcs7-signature"; '
        + f'micalg={micalg};\r\n boundary="{boundary}"\r\n'.encode()
        + CRLF
        + b"This is an S/MIME signed message\r\n"
        + CRLF
        + b"--" + b + CRLF
        + out.entity
        + CRLF + b"--" + b + CRLF
        + b'Content-Type: application/pkcs7-signature; name="smime.p7s"\r\n'
        + b"Content-Transfer-Encoding: base64\r\n"
        + b'Content-Disposition: attachment; filename="smime.p7s"\r\n'
        + CRLF
        + _b64_lines(signature_der)
        + CRLF + b"--" + b + b"--" + CRLF
    )  # fmt: skip


def pkcs7_mime(envelope: tuple[Header, ...], der: bytes, smime_type: str) -> bytes:
    """An application/pkcs7-mime message (opaque signed-data, enveloped-data …)."""
    return (
        _envelope_lines(envelope)
        + b"MIME-Version: 1.0\r\n"
        + f'Content-Type: application/pkcs7-mime; smime-type={smime_type}; name="smime.p7m"\r\n'
        .encode()
        + b"Content-Transfer-Encoding: base64\r\n"
        + b'Content-Disposition: attachment; filename="smime.p7m"\r\n'
        + CRLF
        + _b64_lines(der)
    )  # fmt: skip


def with_envelope(envelope: tuple[Header, ...], entity: bytes) -> bytes:
    """The message without its S/MIME layer: the envelope headers around the entity that
    was encrypted or signed (just the entity when there were none, as for bare CMS)."""
    if not envelope:
        return entity
    newline = CRLF if CRLF in entity[:1000] else b"\n"
    lines = [h.line().replace(CRLF, newline) for h in envelope]
    if _split_header_block(entity) is None:  # content without MIME headers
        return newline.join(lines) + newline + newline + entity
    lines.append(b"MIME-Version: 1.0")
    return newline.join(lines) + newline + entity
