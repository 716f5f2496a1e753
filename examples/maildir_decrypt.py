#!/usr/bin/env python3
"""How a mail client uses tokend: decrypt every S/MIME message of a Maildir folder into a
second Maildir, and sign an outgoing message — with keys that never leave the tokens.

    python examples/maildir_decrypt.py ~/Maildir/INBOX ~/Maildir/Decrypted \\
        [--sign outgoing.eml --signed-out signed.eml] [--pin-fd FD]

It talks to the daemon only through `tokend.client` (socket: $TOKEND_SOCKET, else
$XDG_RUNTIME_DIR/tokend/tokend.sock); `tokend.smime` does the CMS and MIME work. Each
message is matched against the certificates of every present token — old (retired) keys
included — and the token's PIN is asked once per token insertion (from the terminal, or one
line per PIN from --pin-fd). If a token leaves in the middle of the folder, the message in
flight and every later one for that token fail with a clear line and nothing wrong is
written; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import getpass
import mailbox
import os
import sys

from tokend.client import Client
from tokend.errors import PinIncorrectError, PinLockedError, TokendError
from tokend.smime import Keyring, SignOptions, SmimeError, TokenRef, decrypt, sign
from tokend.smime.signing import choose_signer

ENCRYPTED = {"application/pkcs7-mime", "application/x-pkcs7-mime"}


def pin_reader(fd: int | None):  # type: ignore[no-untyped-def]
    """A PIN source for the keyring: the next line of ``fd``, or a terminal prompt."""

    def ask(token: TokenRef, context: bool) -> str:
        if fd is None:
            again = " (again, for this signature)" if context else ""
            return getpass.getpass(f"PIN for {token}{again}: ")
        line = bytearray()
        while not line.endswith(b"\n"):
            chunk = os.read(fd, 1)
            if not chunk:
                break
            line += chunk
        return line.decode().rstrip("\r\n")

    return ask


def is_encrypted(msg: mailbox.MaildirMessage) -> bool:
    if msg.get_content_type() not in ENCRYPTED:
        return False
    kind = (msg.get_param("smime-type") or "enveloped-data").lower()
    return kind in ("enveloped-data", "authenveloped-data")


def decrypt_folder(keyring: Keyring, inbox: mailbox.Maildir, out: mailbox.Maildir) -> int:
    failures = 0
    for key in sorted(inbox.keys()):
        msg = inbox[key]
        subject = msg.get("Subject", "(no subject)")
        if not is_encrypted(msg):
            print(f"{key}: {subject}: not encrypted, skipped", file=sys.stderr)
            continue
        try:
            result = decrypt(keyring, msg.as_bytes())
        except (PinIncorrectError, PinLockedError):
            raise  # never try a wrong PIN again message after message: stop the batch
        except (SmimeError, TokendError) as exc:  # one line: insert the token, removed …
            failures += 1
            print(f"{key}: {subject}: FAILED: {exc}", file=sys.stderr)
            continue
        decrypted = mailbox.MaildirMessage(result.message())
        decrypted.set_flags(msg.get_flags())
        out.add(decrypted)
        print(
            f"{key}: {subject}: decrypted with {result.key.label} on {result.key.token}",
            file=sys.stderr,
        )
    return failures


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("inbox", help="Maildir folder to read")
    parser.add_argument("out", help="Maildir folder for the decrypted messages (created)")
    parser.add_argument("--socket", help="tokend's socket (default: $TOKEND_SOCKET, …)")
    parser.add_argument("--pin-fd", type=int, help="read PINs from this descriptor")
    parser.add_argument("--sign", metavar="FILE", help="also sign this outgoing message")
    parser.add_argument("--signed-out", metavar="FILE", help="where the signed message goes")
    parser.add_argument("--sign-token", metavar="SERIAL", help="the token to sign with")
    args = parser.parse_args(argv)
    if args.sign and not args.signed_out:
        parser.error("--sign needs --signed-out")

    inbox = mailbox.Maildir(args.inbox, create=False)
    out = mailbox.Maildir(args.out, create=True)
    with Client(args.socket) as client, Keyring(client, pin_reader(args.pin_fd)) as keyring:
        try:
            failures = decrypt_folder(keyring, inbox, out)
        except (PinIncorrectError, PinLockedError) as exc:
            left = getattr(exc, "retries", None)
            print(f"wrong PIN ({left} tries left); stopping", file=sys.stderr)
            return 1
        if args.sign:
            try:
                with open(args.sign, "rb") as fh:
                    outgoing = fh.read()
                signer = choose_signer(keyring, token_serial=args.sign_token)
                signed = sign(keyring, outgoing, SignOptions(), signer=signer)
            except SmimeError as exc:
                print(f"{args.sign}: FAILED to sign: {exc}", file=sys.stderr)
                return 1
            with open(args.signed_out, "wb") as fh:
                fh.write(signed)
            print(f"{args.sign}: signed with {signer.label} on {signer.token}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
