"""tokenctl: inspect and use tokens through the tokend daemon (never the token directly)."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tokend.cli.common import EXIT_FAILED, EXIT_USAGE, UsageError, explain, read_secret
from tokend.client import Client
from tokend.model import Mechanism, OaepParams
from tokend.pkcs11 import CKA, CKG, CKM
from tokend.protocol import unb64

DECRYPT_MECHANISMS = {
    "rsa-pkcs": Mechanism(CKM.CKM_RSA_PKCS),
    "oaep-sha1": Mechanism(CKM.CKM_RSA_PKCS_OAEP, OaepParams(CKM.CKM_SHA_1, CKG.CKG_MGF1_SHA1)),
    "oaep-sha256": Mechanism(
        CKM.CKM_RSA_PKCS_OAEP, OaepParams(CKM.CKM_SHA256, CKG.CKG_MGF1_SHA256)
    ),
}
SIGN_MECHANISMS = {
    "sha256-rsa-pkcs": Mechanism(CKM.CKM_SHA256_RSA_PKCS),
    "ecdsa-sha256": Mechanism(CKM.CKM_ECDSA_SHA256),
    "ecdsa": Mechanism(CKM.CKM_ECDSA),
    "rsa-pkcs": Mechanism(CKM.CKM_RSA_PKCS),
}


def _client(args: argparse.Namespace) -> Client:
    return Client(args.socket)


def _pick_slot(client: Client, token: str | None) -> int:
    """A slot id, a token serial (or its prefix), or the only token present."""
    slots = client.slot_list(token_present=True)
    if token is None:
        if len(slots) == 1:
            return slots[0]
        if not slots:
            raise UsageError("no token present: plug one in (tokenctl list shows the slots)")
        raise UsageError("several tokens present: choose one with --token SERIAL or SLOT")
    if token.isdigit() and int(token) in slots:
        return int(token)
    matches = [s for s in slots if client.token_info(s)["token_serial"].startswith(token)]
    if len(matches) != 1:
        raise UsageError(f"no single token matches {token!r} (tokenctl list shows them)")
    return matches[0]


def _find_key(client: Client, session: int, key: str | None, usage: CKA) -> int:
    """A private key by CKA_ID (hex), label substring, or PIV slot name (9d, 82…)."""
    handles = client.find_objects(session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", usage: True})
    if not handles:
        raise UsageError(f"no private key with {usage.name} on the token (logged in?)")
    found = []
    for h in handles:
        attrs = client.get_attributes(session, h, [CKA.CKA_ID, CKA.CKA_LABEL])
        label = attrs.get("CKA_LABEL") or ""
        key_id = unb64(attrs["CKA_ID"]).hex() if attrs.get("CKA_ID") else ""
        if (
            key is None
            or key.lower() in (key_id, label.lower())
            or f"({key.lower()})" in label.lower()
        ):
            found.append(h)
    if len(found) != 1:
        raise UsageError(
            f"{len(found)} keys match {key!r}: name one with --key (id, label or slot like 9d)"
        )
    return found[0]


def cmd_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        rows: list[dict[str, Any]] = []
        for slot in client.slot_list():
            info = client.slot_info(slot)
            row: dict[str, Any] = {
                "slot": slot,
                "reader": info["slot_description"],
                "present": "CKF_TOKEN_PRESENT" in info["flags"],
            }
            if row["present"]:
                try:
                    tinfo = client.token_info(slot)
                    row.update(
                        label=tinfo["label"], serial=tinfo["token_serial"], model=tinfo["model"]
                    )
                except Exception as exc:  # gone between the two calls
                    row.update(present=False, error=explain(exc))
            rows.append(row)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print("no readers")
    else:
        for row in rows:
            token = f"{row['label']}  serial {row['serial']}" if row["present"] else "(empty)"
            print(f"slot {row['slot']}: {row['reader']}: {token}")
    return 0


def _login(client: Client, session: int, args: argparse.Namespace) -> None:
    pin = read_secret("PIN: ", args.pin_fd)
    client.login(session, pin)


def _read_input(path: str | None) -> bytes:
    if path in (None, "-"):
        return sys.stdin.buffer.read()
    return Path(path).read_bytes()


def _write_output(path: str | None, data: bytes) -> None:
    if path in (None, "-"):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        Path(path).write_bytes(data)


def cmd_decrypt(args: argparse.Namespace) -> int:
    data = _read_input(args.input)
    with _client(args) as client:
        slot = _pick_slot(client, args.token)
        session = client.open_session(slot)
        _login(client, session, args)
        key = _find_key(client, session, args.key, CKA.CKA_DECRYPT)
        plain = client.decrypt(session, key, DECRYPT_MECHANISMS[args.mechanism], data)
    _write_output(args.output, plain)
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    data = _read_input(args.input)
    with _client(args) as client:
        slot = _pick_slot(client, args.token)
        session = client.open_session(slot)
        _login(client, session, args)
        key = _find_key(client, session, args.key, CKA.CKA_SIGN)
        always = client.get_attributes(session, key, [CKA.CKA_ALWAYS_AUTHENTICATE])
        context_pin = None
        if always.get("CKA_ALWAYS_AUTHENTICATE"):
            context_pin = read_secret("PIN (again, for this signature): ", args.pin_fd)
        sig = client.sign(session, key, SIGN_MECHANISMS[args.mechanism], data, context_pin)
    _write_output(args.output, sig)
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        slot = _pick_slot(client, args.token)
        info = client.token_info(slot)
        try:
            status = client.call("tokend_GetTokenStatus", {"slot_id": slot})
        except Exception:
            status = {}
    if args.json:
        print(json.dumps({"slot": slot, "token": info, **status}, indent=2))
        return 0
    print(f"slot {slot}: {info['label']}  serial {info['token_serial']}  model {info['model']}")
    for key, value in status.items():
        print(f"  {key}: {value}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenctl",
        description="Inspect, use and provision hardware tokens through the tokend daemon.",
        epilog="Exit codes: 0 ok, 1 operation failed, 2 usage error. PINs are read without "
        "echo from the terminal, or from a file descriptor with --pin-fd (never from argv).",
    )
    parser.add_argument(
        "--socket",
        help="daemon socket (default: $TOKEND_SOCKET, else $XDG_RUNTIME_DIR/tokend/tokend.sock)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("list", help="slots and the tokens in them")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("status", help="identity, PIN retries and key slots of a token")
    p.add_argument("token", nargs="?", help="token serial (prefix) or slot id")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    for name, func, mechs, default, what in (
        ("decrypt", cmd_decrypt, DECRYPT_MECHANISMS, "rsa-pkcs", "decrypt a key-transport blob"),
        ("sign", cmd_sign, SIGN_MECHANISMS, "sha256-rsa-pkcs", "sign data (or a digest)"),
    ):
        p = sub.add_parser(name, help=what)
        p.add_argument("--token", help="token serial (prefix) or slot id (default: the only one)")
        p.add_argument("--key", help="key: CKA_ID hex, label, or PIV slot such as 9d / 9c / 82")
        p.add_argument("--mechanism", choices=sorted(mechs), default=default)
        p.add_argument("--in", dest="input", help="input file (default: stdin)")
        p.add_argument("--out", dest="output", help="output file (default: stdout)")
        p.add_argument("--pin-fd", type=int, help="read the PIN from this file descriptor")
        p.set_defaults(func=func)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"tokenctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_FAILED
    except Exception as exc:
        print(f"tokenctl: {explain(exc)}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
