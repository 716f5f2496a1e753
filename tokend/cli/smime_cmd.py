"""`tokenctl smime decrypt|sign|verify` (and the older `tokenctl smime-decrypt`): S/MIME
mail through the daemon, with `tokend.smime` doing the CMS and MIME work. Registered by
`tokenctl.build_parser` through `register`."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from tokend.cli.common import read_secret
from tokend.smime import (
    Keyring,
    SignOptions,
    SmimeError,
    TokenRef,
    decrypt,
    load_anchors,
    sign,
    verify,
)
from tokend.smime.signing import DIGESTS, choose_signer


def _ctl() -> Any:
    from tokend.cli import tokenctl  # the shared tokenctl helpers (imported late: no cycle)

    return tokenctl


def _pin_source(args: argparse.Namespace) -> Any:
    def ask(token: TokenRef, context: bool) -> str:
        prompt = f"PIN for {token}" + (" (again, for this operation)" if context else "") + ": "
        return read_secret(prompt, getattr(args, "pin_fd", None))

    return ask


def _keyring(client: Any, args: argparse.Namespace) -> Keyring:
    slot = _ctl()._pick_slot(client, args.token) if args.token else None
    return Keyring(client, _pin_source(args), slot_id=slot)


def cmd_decrypt(args: argparse.Namespace) -> int:
    ctl = _ctl()
    data = ctl._read_file(args.file)
    with ctl._client(args) as client, _keyring(client, args) as keyring:
        try:
            result = decrypt(keyring, data)
        except SmimeError as exc:
            raise ctl.OperationFailed(str(exc)) from None
    ctl._write_output(args.output, result.message())
    how = "integrity checked, " if result.authenticated else ""
    print(
        f"decrypted ({how}key {result.key.label} on {result.key.token})",
        file=sys.stderr,
    )
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    ctl = _ctl()
    data = ctl._read_file(args.file)
    options = SignOptions(digest=args.digest, pss=args.pss, opaque=args.opaque)
    with ctl._client(args) as client, _keyring(client, args) as keyring:
        try:
            signer = choose_signer(keyring, args.key)
            signed = sign(keyring, data, options, signer=signer)
        except SmimeError as exc:
            raise ctl.OperationFailed(str(exc)) from None
    ctl._write_output(args.output, signed)
    kind = "opaque signed-data" if args.opaque else "multipart/signed"
    print(f"signed ({kind}, {args.digest}) with {signer.label} on {signer.token}", file=sys.stderr)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    ctl = _ctl()
    data = ctl._read_file(args.file)
    try:
        anchors = load_anchors(args.ca)
        result = verify(data, anchors)
    except SmimeError as exc:
        raise ctl.OperationFailed(str(exc)) from None
    ctl._write_output(args.output, result.message())
    print(result.verdict(), file=sys.stderr)
    return 0


def _common(p: argparse.ArgumentParser, *, token: bool = True) -> None:
    p.add_argument("file", help="the message ('-' for stdin)")
    p.add_argument("--out", dest="output", metavar="FILE", help="output file (default: stdout)")
    if token:
        ctl = _ctl()
        ctl._token_opt(p)
        ctl._pin_opt(p)


def _decrypt_parser(p: argparse.ArgumentParser) -> None:
    _common(p)
    p.set_defaults(func=cmd_decrypt)


DECRYPT_HELP = (
    "decrypt an S/MIME message (or CMS, DER or PEM) with whichever present token holds the "
    "recipient key, retired keys included"
)
DECRYPT_EPILOG = (
    "Handles EnvelopedData and AuthEnvelopedData: RSA (PKCS#1 v1.5, OAEP SHA-1/2) and ECDH "
    "P-256/P-384 recipients; AES-CBC, AES-GCM and 3DES content. Prints the message without "
    "its encryption (its From/To/Subject kept); which key opened it goes to stderr."
)


def register(sub: Any) -> None:
    """Add `smime` (decrypt, sign, verify) and the `smime-decrypt` alias to tokenctl."""
    smime = sub.add_parser("smime", help="S/MIME mail: decrypt, sign, verify").add_subparsers(
        dest="smime_command", required=True, metavar="ACTION"
    )

    p = smime.add_parser("decrypt", help=DECRYPT_HELP, epilog=DECRYPT_EPILOG)
    _decrypt_parser(p)

    p = smime.add_parser(
        "sign",
        help="sign a message with the token (detached multipart/signed by default)",
        epilog="FILE is a whole message (its From/To/Subject stay outside the signature) "
        "or plain text. RSA keys sign with PKCS#1 v1.5 (or --pss), EC keys with ECDSA. The "
        "signature carries the signing time, the signer's certificate and the S/MIME "
        "capabilities. A PIN-always key (PIV 9C) asks for the PIN again for the signature.",
    )
    _common(p)
    p.add_argument(
        "--opaque",
        action="store_true",
        help="opaque application/pkcs7-mime signed-data instead of multipart/signed",
    )
    p.add_argument("--digest", choices=DIGESTS, default="sha256", help="default: sha256")
    p.add_argument("--pss", action="store_true", help="RSA keys: RSASSA-PSS")
    p.add_argument(
        "--key", help="signing key: CKA_ID hex, label or PIV slot (9c); default: the token's "
        "mail-signing certificate"
    )  # fmt: skip
    p.set_defaults(func=cmd_sign)

    p = smime.add_parser(
        "verify",
        help="verify a signed message and its signer's chain to the CA certificates given",
        epilog="Prints the signed message on success and the verdict on stderr; exit 1 with "
        "the reason when the signature, the content or the chain does not verify.",
    )
    _common(p, token=False)
    p.add_argument(
        "--ca", required=True, metavar="FILE|DIR",
        help="trusted CA certificates: a PEM/DER file or a directory of them",
    )  # fmt: skip
    p.set_defaults(func=cmd_verify)

    p = sub.add_parser("smime-decrypt", help="the same as `smime decrypt`", epilog=DECRYPT_EPILOG)
    _decrypt_parser(p)
