"""tokenctl: inspect, use and provision tokens through the tokend daemon (never the token
directly: the daemon stays the only program driving it). docs/provisioning.md tells the
user's story; docs/protocol.md the calls used."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from asn1crypto import algos, csr, keys, pem
from asn1crypto import x509 as ax509
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import pkcs12

from tokend import __version__
from tokend.cli import ble as ble_cli
from tokend.cli import p11kit_module
from tokend.cli import uri as p11uri
from tokend.cli.common import (
    EXIT_FAILED,
    EXIT_USAGE,
    DaemonUnreachable,
    UsageError,
    confirm,
    explain,
    read_secret,
)
from tokend.client import Client, UntrustedServerError
from tokend.errors import DeviceMemoryError
from tokend.model import Mechanism, OaepParams, ProvisioningProfile
from tokend.piv.profile import PIV_PROFILE
from tokend.pkcs11 import CKA, CKG, CKM
from tokend.protocol import b64, unb64
from tokend.wipe import wipe

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
#: The token kind tokenctl provisions (its key slots, algorithms, admin credential).
PROFILE = PIV_PROFILE
ALGORITHMS = tuple(PROFILE.algorithms)
MGMT_ALGORITHMS = {name: length for name, (_, length) in PROFILE.admin_algorithms.items()}
RETIRED_TOTAL = 20
#: Largest input file read: keys, certificates, PKCS#12 files and blobs are kilobytes;
#: S/MIME messages (attachments) may be large. Reading stops one byte past the cap, so
#: /dev/zero or a huge file fails fast instead of filling memory.
MAX_INPUT_BYTES = 1 << 20
MAX_MESSAGE_BYTES = 64 << 20


# --- connecting and choosing ---------------------------------------------------------------


def _client(args: argparse.Namespace) -> Client:
    try:
        # On-card RSA generation can take a minute on real hardware.
        return Client(args.socket, timeout=300.0)
    except UntrustedServerError:
        raise  # not "unreachable": someone else answers there (explain() says who)
    except OSError:
        from tokend.paths import default_socket_path

        raise DaemonUnreachable(args.socket or default_socket_path()) from None


def _uri(text: str) -> p11uri.Pkcs11Uri:
    try:
        return p11uri.parse(text)
    except p11uri.UriError as exc:
        raise UsageError(str(exc)) from None


def _pick_slot(client: Client, token: str | None) -> int:
    """A slot id, a token serial (or its prefix), a PKCS#11 URI, or the only token."""
    slots = client.slot_list(token_present=True)
    if token is None:
        if len(slots) == 1:
            return slots[0]
        if not slots:
            raise UsageError("no token present: plug one in (tokenctl list shows the slots)")
        raise UsageError("several tokens present: choose one with --token SERIAL, SLOT or URI")
    if p11uri.is_uri(token):
        uri = _uri(token)
        matches = [s for s in slots if uri.matches_token(client.token_info(s), s)]
    elif token.isdigit() and int(token) in slots:
        return int(token)
    else:
        matches = [s for s in slots if client.token_info(s)["token_serial"].startswith(token)]
    if len(matches) != 1:
        which = "no token" if not matches else f"{len(matches)} tokens"
        raise UsageError(f"{which} match {token!r} (tokenctl list shows them)")
    return matches[0]


def _slot_arg(text: str) -> int:
    """A key slot: name (sign, encrypt, auth, card-auth, retiredN), hex (9d, 82) or URI."""
    value = text.strip().lower()
    if p11uri.is_uri(text):
        try:
            return p11uri.slot_of(_uri(text))
        except p11uri.UriError as exc:
            raise UsageError(str(exc)) from None
    try:
        return PROFILE.parse_key_slot(value)
    except ValueError:
        pass
    raise UsageError(
        f"unknown key slot {text!r}: use sign|9c, encrypt|9d, auth|9a, card-auth|9e, 82-95 "
        "or a pkcs11: URI with id= or object="
    )


def _profile_of(client: Client, slot_id: int) -> ProvisioningProfile:
    """The provisioning profile of the token in ``slot_id`` (by the applet it reports)."""
    from tokend.wiring import PROFILES

    applet = client.token_info(slot_id).get("applet", PROFILE.applet)
    return PROFILES.get(str(applet), PROFILE)


def _token_slot(client: Client, slot_id: int, text: str) -> int:
    """A key slot read with the profile of the token in ``slot_id`` (PIV: sign|9c …; a
    SIM: sign|01, encrypt|00 …); URIs as for PIV."""
    if p11uri.is_uri(text):
        return _slot_arg(text)
    try:
        return _profile_of(client, slot_id).parse_key_slot(text)
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _token_of(args: argparse.Namespace, *selectors: str | None) -> str | None:
    """--token, else the token part of an object URI given for the slot/key."""
    if getattr(args, "token", None):
        return str(args.token)
    for sel in selectors:
        if sel and p11uri.is_uri(sel) and _uri(sel).selects_token:
            return sel
    return None


def _session(client: Client, slot: int, args: argparse.Namespace, *, rw: bool, login: bool) -> int:
    session = client.open_session(slot, rw=rw)
    if login:
        client.login(session, read_secret("PIN: ", getattr(args, "pin_fd", None)))
    return session


def _mgmt_key(args: argparse.Namespace) -> str | None:
    """The current management key as hex (None: the PIV default)."""
    if getattr(args, "mgmt_key_file", None):
        text = _read_file(args.mgmt_key_file).decode(errors="replace")
    elif getattr(args, "mgmt_key_fd", None) is not None:
        text = read_secret("management key: ", args.mgmt_key_fd, option="--mgmt-key-fd")
    else:
        return None
    return _hex(text.strip(), "management key")


def _hex(text: str, what: str) -> str:
    clean = text.replace(":", "").replace(" ", "")
    try:
        bytes.fromhex(clean)
    except ValueError:
        raise UsageError(f"the {what} must be hex") from None
    return clean


def _read_file(path: str, limit: int = MAX_INPUT_BYTES) -> bytes:
    """At most ``limit`` bytes of ``path`` ("-": stdin); a larger input is refused."""
    try:
        if path == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(path, "rb") as fh:
                data = fh.read(limit + 1)
    except OSError as exc:
        raise UsageError(f"cannot read {path}: {exc.strerror}") from None
    if len(data) > limit:
        where = "standard input" if path == "-" else path
        raise UsageError(f"{where} is larger than {limit // 1024} KiB: not an input tokenctl takes")
    return data


def _read_input(path: str | None) -> bytes:
    return _read_file("-" if path is None else path)


def _write_output(path: str | None, data: bytes) -> None:
    if path in (None, "-"):
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    else:
        Path(path).write_bytes(data)


#: CKA_ID of the key used when --key is not given: the profile's encryption key decrypts,
#: its signature key signs.
DEFAULT_KEY_IDS = {
    CKA.CKA_DECRYPT: p11uri.slot_to_id(PROFILE.encryption_slot).hex(),
    CKA.CKA_SIGN: p11uri.slot_to_id(PROFILE.signature_slot).hex(),
}


def _find_key(client: Client, session: int, key: str | None, usage: CKA) -> int:
    """A private key by CKA_ID (hex), label, PIV slot name (9d, 82…) or PKCS#11 URI."""
    template: dict[CKA | str, Any] = {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", usage: True}
    if key is not None and p11uri.is_uri(key):
        template[CKA.CKA_ID] = p11uri.slot_to_id(_slot_arg(key))
        key = None
    handles = client.find_objects(session, template)
    if not handles:
        raise UsageError(f"no private key with {usage.name} on the token (logged in?)")
    found = []
    ids: dict[int, str] = {}
    for h in handles:
        attrs = client.get_attributes(session, h, [CKA.CKA_ID, CKA.CKA_LABEL])
        label = attrs.get("CKA_LABEL") or ""
        key_id = unb64(attrs["CKA_ID"]).hex() if attrs.get("CKA_ID") else ""
        ids[h] = key_id
        if (
            key is None
            or key.lower() in (key_id, label.lower())
            or f"({key.lower()})" in label.lower()
        ):
            found.append(h)
    if key is None and len(found) > 1:
        # No --key: the token's current key for the job (PIV 9D decrypts, 9C signs); old
        # encryption keys and other keys only when asked for.
        wanted = DEFAULT_KEY_IDS.get(usage)
        preferred = [h for h, kid in ids.items() if kid == wanted]
        if len(preferred) == 1:
            return preferred[0]
    if len(found) != 1:
        what = "no key matches" if not found else f"{len(found)} keys match"
        raise UsageError(f"{what} {key!r}: name one with --key (id, label or slot like 9d)")
    return found[0]


def _status(client: Client, slot: int) -> dict[str, Any]:
    return dict(client.call("tokend_GetTokenStatus", {"slot_id": slot})["status"])


@contextmanager
def _progress(what: str) -> Iterator[None]:
    """A spinner with elapsed seconds on a terminal; one line otherwise."""
    start = time.monotonic()
    done = threading.Event()
    tty = sys.stderr.isatty()

    def spin() -> None:
        frames = "|/-\\"
        i = 0
        while not done.wait(0.1):
            sys.stderr.write(f"\r{what} {frames[i % 4]} {time.monotonic() - start:4.1f} s")
            sys.stderr.flush()
            i += 1

    spinner = threading.Thread(target=spin, daemon=True) if tty else None
    if spinner is not None:
        spinner.start()
    ok = False
    try:
        yield
        ok = True
    finally:
        done.set()
        if spinner is not None:
            spinner.join()
            sys.stderr.write("\r\x1b[K")
        elapsed = time.monotonic() - start
        sys.stderr.write(f"{what} {'done' if ok else 'failed'} in {elapsed:.1f} s\n")
        sys.stderr.flush()


# --- list, status, use -----------------------------------------------------------------------


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


def cmd_decrypt(args: argparse.Namespace) -> int:
    data = _read_input(args.input)
    with _client(args) as client:
        slot = _pick_slot(client, _token_of(args, args.key))
        session = _session(client, slot, args, rw=False, login=True)
        key = _find_key(client, session, args.key, CKA.CKA_DECRYPT)
        plain = client.decrypt(session, key, DECRYPT_MECHANISMS[args.mechanism], data)
    _write_output(args.output, plain)
    return 0


def cmd_sign(args: argparse.Namespace) -> int:
    data = _read_input(args.input)
    with _client(args) as client:
        slot = _pick_slot(client, _token_of(args, args.key))
        session = _session(client, slot, args, rw=False, login=True)
        key = _find_key(client, session, args.key, CKA.CKA_SIGN)
        attrs = client.get_attributes(session, key, [CKA.CKA_ALWAYS_AUTHENTICATE, CKA.CKA_KEY_TYPE])
        context_pin = None
        if attrs.get("CKA_ALWAYS_AUTHENTICATE"):
            context_pin = read_secret("PIN (again, for this signature): ", args.pin_fd)
        sig = client.sign(session, key, SIGN_MECHANISMS[args.mechanism], data, context_pin)
    if args.der and attrs.get("CKA_KEY_TYPE") == "CKK_EC":
        sig = algos.DSASignature.from_p1363(sig).dump()
    _write_output(args.output, sig)
    return 0


def _cert_line(cert: dict[str, Any] | None) -> str:
    if cert is None:
        return "no certificate"
    if "subject" not in cert:
        return "unreadable certificate"
    days = cert["days_left"]
    when = f"{days} days left" if days >= 0 else f"EXPIRED {-days} days ago"
    return (
        f"{cert['subject']}\n        issuer {cert['issuer']}  serial {cert['serial']}\n"
        f"        valid {cert['not_before'][:10]} .. {cert['not_after'][:10]} ({when})"
    )


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        slot = _pick_slot(client, args.token)
        info = client.token_info(slot)
        status = _status(client, slot)
    if args.json:
        print(json.dumps({"slot": slot, "token": info, "status": status}, indent=2))
        return 0
    version = f", firmware {status['version']}" if status.get("version") else ""
    print(f"slot {slot}: {info['label']}  serial {status['serial']}  ({status['applet']}{version})")

    def retries(n: int | None) -> str:
        return "unknown" if n is None else ("BLOCKED" if n == 0 else f"{n} tries left")

    print(f"  PIN: {retries(status['pin_retries'])}   PUK: {retries(status['puk_retries'])}")
    current = [s for s in status["slots"] if s["role"] != "retired"]
    retired = [s for s in status["slots"] if s["role"] == "retired"]
    for title, rows in (("key slots", current), ("retired keys (decrypt only)", retired)):
        print(f"  {title}:" + ("" if rows else " none"))
        for s in rows:
            key = (s["algorithm"] or "key") if s["has_key"] else "no key"
            use = "+".join(s["usage"]) or "-"
            origin = f", {s['origin']}" if s.get("origin") else ""
            print(f"    {s['slot']} {s['role']:<14} {key} ({use}{origin})")
            print(f"        {_cert_line(s['certificate'])}")
    if retired:
        print(f"  retired slots used: {len(retired)} of {RETIRED_TOTAL}")
    return 0


# --- PIN, PUK, management key ---------------------------------------------------------------


def _provision_session(client: Client, args: argparse.Namespace, *, login: bool) -> int:
    slot = _pick_slot(client, _token_of(args, getattr(args, "slot", None)))
    return _session(client, slot, args, rw=True, login=login)


def _provision_target(client: Client, args: argparse.Namespace, *, login: bool) -> tuple[int, int]:
    """(session, key slot of --slot read with the token's own profile)."""
    slot_id = _pick_slot(client, _token_of(args, getattr(args, "slot", None)))
    key_slot = _token_slot(client, slot_id, args.slot)
    return _session(client, slot_id, args, rw=True, login=login), key_slot


def _replace_secret(
    args: argparse.Namespace,
    method: str,
    current: tuple[str, str, int | None, str],
    new: tuple[str, str, int | None],
    done: str,
) -> int:
    """PIN change, PIN unblock and PUK change share one shape: prove one secret, set another.
    ``current`` = (param, prompt, fd, fd option); ``new`` = (param, prompt, fd)."""
    with _client(args) as client:
        session = _provision_session(client, args, login=False)
        old_value = read_secret(current[1], current[2], option=current[3])
        new_value = read_secret(new[1], new[2], confirm=True)
        client.call(method, {"h_session": session, current[0]: old_value, new[0]: new_value})
    print(done, file=sys.stderr)
    return 0


def cmd_pin_change(args: argparse.Namespace) -> int:
    return _replace_secret(
        args,
        "C_SetPIN",
        ("p_old_pin", "current PIN: ", args.pin_fd, "--pin-fd"),
        ("p_new_pin", "new PIN: ", _fd(args.new_pin_fd, args.pin_fd)),
        "PIN changed",
    )


def cmd_pin_unblock(args: argparse.Namespace) -> int:
    return _replace_secret(
        args,
        "tokend_UnblockPin",
        ("p_puk", "PUK: ", args.puk_fd, "--puk-fd"),
        ("p_new_pin", "new PIN: ", _fd(args.new_pin_fd, args.puk_fd)),
        "PIN unblocked and set",
    )


def cmd_puk_change(args: argparse.Namespace) -> int:
    return _replace_secret(
        args,
        "tokend_ChangePuk",
        ("p_old_puk", "current PUK: ", args.puk_fd, "--puk-fd"),
        ("p_new_puk", "new PUK: ", _fd(args.new_puk_fd, args.puk_fd)),
        "PUK changed",
    )


def _fd(first: int | None, fallback: int | None) -> int | None:
    return first if first is not None else fallback


def cmd_mgmt_key_set(args: argparse.Namespace) -> int:
    length = MGMT_ALGORITHMS[args.algorithm]
    store = Path(args.store) if args.store else None
    if store is not None and store.exists() and not args.force:
        raise UsageError(f"{store} exists; choose another file or add --force")
    with _client(args) as client:
        session = _provision_session(client, args, login=True)
        current = _mgmt_key(args)
        if args.new_key_fd is not None:
            text = read_secret("new management key: ", args.new_key_fd, option="--new-key-fd")
            new = _hex(text, "new management key")
            if len(new) != 2 * length:
                raise UsageError(
                    f"a {args.algorithm} management key is {length} bytes ({2 * length} hex)"
                )
        else:
            new = os.urandom(length).hex()
        previous = store.read_bytes() if store is not None and store.exists() else None
        if store is not None:
            # Stored before the token changes: a key that cannot be written is never set.
            try:
                fd = os.open(store, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
                with os.fdopen(fd, "w") as fh:
                    fh.write(new + "\n")
            except OSError as exc:
                raise OperationFailed(f"cannot write {store}: {exc.strerror}") from None
        params = {
            "h_session": session,
            "new_management_key": new,
            "algorithm": args.algorithm,
            "require_touch": args.require_touch,
        }
        if current is not None:
            params["management_key"] = current
        try:
            client.call("tokend_SetManagementKey", params)
        except BaseException:
            if store is not None and previous is not None:
                store.write_bytes(previous)  # --force: the file may hold the current key
            elif store is not None:
                store.unlink(missing_ok=True)
            raise
    if store is not None:
        print(f"management key changed; stored in {store} (mode 0600)", file=sys.stderr)
    elif args.new_key_fd is None:
        print(new)
        print("management key changed to the random key above: keep it safe", file=sys.stderr)
    else:
        print("management key changed", file=sys.stderr)
    return 0


# --- keys and certificates ------------------------------------------------------------------


def _with_mgmt(params: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    key = _mgmt_key(args)
    if key is not None:
        params["management_key"] = key
    return params


def cmd_keys_generate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        session, slot = _provision_target(client, args, login=True)
        params = _with_mgmt(
            {"h_session": session, "key_slot": f"{slot:02x}", "algorithm": args.alg}, args
        )
        for name in ("pin_policy", "touch_policy"):
            if getattr(args, name):
                params[name] = getattr(args, name)
        with _progress(f"generating {args.alg} key in slot {slot:02x}"):
            result = client.call("tokend_GenerateKeyPair", params)
    public = serialization.load_der_public_key(unb64(result["public_key"]))
    pem_text = public.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    _write_output(args.public_out, pem_text)
    print(
        f"next: tokenctl csr --slot {slot:02x} --subject 'CN=…' --out req.pem, have it "
        f"signed, then tokenctl cert import CERT --slot {slot:02x}",
        file=sys.stderr,
    )
    return 0


def cmd_keys_delete(args: argparse.Namespace) -> int:
    slot = _slot_arg(args.slot)
    if not confirm(
        f"delete the key and certificate in slot {slot:02x}? It cannot be undone", args.yes
    ):
        return EXIT_FAILED
    with _client(args) as client:
        session = _provision_session(client, args, login=True)
        client.call(
            "tokend_DeleteKey", _with_mgmt({"h_session": session, "key_slot": f"{slot:02x}"}, args)
        )
    print(f"slot {slot:02x} emptied", file=sys.stderr)
    return 0


def _subject(text: str) -> ax509.Name:
    try:
        name = x509.Name.from_rfc4514_string(text)
    except ValueError as exc:
        raise UsageError(
            f"bad --subject {text!r}: {exc} (example: 'CN=Ann Example,O=Example')"
        ) from None
    return ax509.Name.load(name.public_bytes())


def cmd_csr(args: argparse.Namespace) -> int:
    subject = _subject(args.subject)
    with _client(args) as client:
        slot_id = _pick_slot(client, _token_of(args, args.slot))
        slot = _token_slot(client, slot_id, args.slot)
        profile = _profile_of(client, slot_id)
        key_id = profile.key_ids.get(slot) or _status_key_id(client, slot_id, slot)
        session = client.open_session(slot_id)
        pubs = client.find_objects(session, {CKA.CKA_CLASS: "CKO_PUBLIC_KEY", CKA.CKA_ID: key_id})
        if not pubs:
            raise UsageError(f"no key in slot {slot:02x}: generate one with tokenctl keys generate")
        spki = unb64(
            client.get_attributes(session, pubs[0], [CKA.CKA_PUBLIC_KEY_INFO])[
                "CKA_PUBLIC_KEY_INFO"
            ]
        )
        public = keys.PublicKeyInfo.load(spki)
        pin = read_secret("PIN: ", args.pin_fd)
        client.login(session, pin)
        handles = client.find_objects(
            session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_ID: key_id, CKA.CKA_SIGN: True}
        )
        if not handles:
            raise UsageError(f"the key in slot {slot:02x} cannot sign")
        key = handles[0]
        always = client.get_attributes(session, key, [CKA.CKA_ALWAYS_AUTHENTICATE])
        info = csr.CertificationRequestInfo(
            {
                "version": "v1",
                "subject": subject,
                "subject_pk_info": public,
                "attributes": _csr_attributes(args, slot == profile.encryption_slot),
            }
        )
        if public.algorithm == "rsa":
            algorithm, mechanism = "sha256_rsa", "CKM_SHA256_RSA_PKCS"
        elif public.curve[1] == "secp384r1":
            algorithm, mechanism = "sha384_ecdsa", "CKM_ECDSA_SHA384"
        else:
            algorithm, mechanism = "sha256_ecdsa", "CKM_ECDSA_SHA256"
        # The PIN was just typed for this request: it also serves the key's per-signature
        # (always-authenticate) login.
        context_pin = pin if always.get("CKA_ALWAYS_AUTHENTICATE") else None
        signature = client.sign(session, key, mechanism, info.dump(), context_pin)
    if public.algorithm != "rsa":
        signature = algos.DSASignature.from_p1363(signature).dump()
    request = csr.CertificationRequest(
        {
            "certification_request_info": info,
            "signature_algorithm": {"algorithm": algorithm},
            "signature": signature,
        }
    )
    der = request.dump()
    _write_output(args.out, der if args.der else pem.armor("CERTIFICATE REQUEST", der))
    return 0


def _status_key_id(client: Client, slot_id: int, slot: int) -> bytes:
    """The CKA_ID of the key in ``slot`` as the token reports it (tokens whose IDs are per
    key, like a SIM's PKCS#15 IDs); empty when the slot holds no key."""
    for s in _status(client, slot_id)["slots"]:
        if s["slot"] == f"{slot:02x}" and s.get("key_id"):
            return bytes.fromhex(s["key_id"])
    return b""


def _csr_attributes(args: argparse.Namespace, encryption: bool) -> list[dict[str, Any]]:
    extensions: list[dict[str, Any]] = []
    if args.email:
        extensions.append(
            {
                "extn_id": "subject_alt_name",
                "critical": False,
                "extn_value": [ax509.GeneralName(name="rfc822_name", value=e) for e in args.email],
            }
        )
    usage = {"key_encipherment"} if encryption else {"digital_signature", "non_repudiation"}
    extensions.append({"extn_id": "key_usage", "critical": True, "extn_value": usage})
    extensions.append(
        {"extn_id": "extended_key_usage", "critical": False, "extn_value": ["email_protection"]}
    )
    return [{"type": "extension_request", "values": [extensions]}]


def _load_certificate(data: bytes, source: str) -> bytes:
    """DER of the (first) certificate in PEM or DER ``data``."""
    try:
        if b"-----BEGIN" in data:
            return x509.load_pem_x509_certificate(data).public_bytes(serialization.Encoding.DER)
        return x509.load_der_x509_certificate(data).public_bytes(serialization.Encoding.DER)
    except ValueError:
        raise UsageError(f"{source} is not an X.509 certificate (PEM or DER)") from None


def cmd_cert_import(args: argparse.Namespace) -> int:
    der = _load_certificate(_read_file(args.file), args.file)
    with _client(args) as client:
        session, slot = _provision_target(client, args, login=True)
        params = {
            "h_session": session,
            "key_slot": f"{slot:02x}",
            "certificate": b64(der),
            "force": args.force,
        }
        client.call("tokend_PutCertificate", _with_mgmt(params, args))
    cert = x509.load_der_x509_certificate(der)
    print(
        f"certificate {cert.subject.rfc4514_string()} written to slot {slot:02x}", file=sys.stderr
    )
    return 0


def cmd_certs_export(args: argparse.Namespace) -> int:
    with _client(args) as client:
        slot_id = _pick_slot(client, _token_of(args, args.slot))
        status = _status(client, slot_id)
    wanted = _slot_arg(args.slot) if args.slot else None
    certs = [
        (s["slot"], unb64(s["certificate"]["der"]))
        for s in status["slots"]
        if s["certificate"] is not None and (wanted is None or s["slot"] == f"{wanted:02x}")
    ]
    if not certs:
        where = f"in slot {wanted:02x}" if wanted is not None else "on the token"
        raise UsageError(f"no certificate {where}")
    if args.der:
        if len(certs) > 1:
            raise UsageError("several certificates: choose one with --slot for --der")
        _write_output(args.out, certs[0][1])
    else:
        _write_output(args.out, b"".join(pem.armor("CERTIFICATE", der) for _, der in certs))
    return 0


# --- PKCS#12 import and renewal -------------------------------------------------------------


def _load_p12(path: str, args: argparse.Namespace) -> tuple[bytearray, bytes, x509.Certificate]:
    """(PKCS#8 DER key, certificate DER, certificate) from a PKCS#12 file, checked: the key
    is one a PIV card holds and the certificate is the key's."""
    data = _read_file(path)
    from asn1crypto import pkcs12 as a_pkcs12

    try:
        a_pkcs12.Pfx.load(data)["auth_safe"]["content_type"].native  # noqa: B018
    except (ValueError, TypeError, KeyError):
        raise OperationFailed(f"{path} is not a PKCS#12 file (corrupt or another format)") from None
    password = read_secret(
        f"password for {Path(path).name}: ", args.password_fd, option="--password-fd"
    )
    loaded = None
    for candidate in [password.encode()] if password else [b"", None]:
        try:
            loaded = pkcs12.load_key_and_certificates(data, candidate)
            break
        except ValueError:
            continue
    if loaded is None:
        raise OperationFailed(f"wrong password for {path} (or the file is damaged)")
    key, cert, extra = loaded
    if key is None:
        raise OperationFailed(f"{path} holds no private key")
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise OperationFailed(
            f"{path}: {type(key).__name__.lstrip('_').replace('PrivateKey', '')} keys cannot go "
            "on a PIV token (RSA 1024-4096 or EC P-256/P-384 only)"
        )
    if isinstance(key, rsa.RSAPrivateKey) and (
        key.key_size not in PROFILE.rsa_sizes or key.public_key().public_numbers().e != 65537
    ):
        raise OperationFailed(
            f"{path}: RSA-{key.key_size} keys cannot go on a PIV token (1024-4096, e=65537)"
        )
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name not in PROFILE.ec_curves:
        raise OperationFailed(
            f"{path}: EC curve {key.curve.name} cannot go on a PIV token (P-256, P-384)"
        )
    spki = _spki(key.public_key())
    candidates = ([cert] if cert is not None else []) + list(extra)
    if not candidates:
        raise OperationFailed(
            f"{path} holds a private key but no certificate: ask for the PKCS#12 with its "
            "certificate; nothing was written"
        )
    matching = [c for c in candidates if _spki(c.public_key()) == spki]
    if not matching:
        raise OperationFailed(
            f"{path}: the certificate does not match the private key; nothing was written"
        )
    cert = matching[0]
    key_der = bytearray(
        key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return key_der, cert.public_bytes(serialization.Encoding.DER), cert


def _spki(public: Any) -> bytes:
    return public.public_bytes(  # type: ignore[no-any-return]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


class OperationFailed(Exception):
    """A check failed before anything was sent to the token (exit 1)."""


def cmd_import_p12(args: argparse.Namespace) -> int:
    key_der, cert_der, cert = _load_p12(args.file, args)
    try:
        with _client(args) as client:
            session, slot = _provision_target(client, args, login=True)
            params = {
                "h_session": session,
                "key_slot": f"{slot:02x}",
                "private_key": b64(key_der),
                "certificate": b64(cert_der),
            }
            for name in ("pin_policy", "touch_policy"):
                if getattr(args, name, None):
                    params[name] = getattr(args, name)
            client.call("tokend_ImportKey", _with_mgmt(params, args))
    finally:
        wipe(key_der)
    print(
        f"imported key and certificate {cert.subject.rfc4514_string()} into slot {slot:02x}",
        file=sys.stderr,
    )
    return 0


def cmd_renew_encryption(args: argparse.Namespace) -> int:
    key_der, cert_der, cert = _load_p12(args.file, args)
    try:
        with _client(args) as client:
            session = _provision_session(client, args, login=True)
            slot_id = _pick_slot(client, _token_of(args))
            encryption = f"{_profile_of(client, slot_id).encryption_slot:02x}"
            params = {
                "h_session": session,
                "key_slot": encryption,
                "private_key": b64(key_der),
                "certificate": b64(cert_der),
            }
            try:
                result = client.call("tokend_RenewKey", _with_mgmt(params, args))
            except DeviceMemoryError:
                raise OperationFailed(
                    f"all {RETIRED_TOTAL} retired key slots (82-95) are full: free the oldest with "
                    "tokenctl retired prune --before YYYY-MM-DD (their mail can no longer be "
                    "decrypted)"
                ) from None
    finally:
        wipe(key_der)
    old = result.get("retired_slot")
    moved = f"old key and certificate kept in retired slot {old} (decrypt only); " if old else ""
    print(f"{moved}new key {cert.subject.rfc4514_string()} in slot {encryption}", file=sys.stderr)
    return 0


def _retired(client: Client, slot_id: int) -> list[dict[str, Any]]:
    return [s for s in _status(client, slot_id)["slots"] if s["role"] == "retired"]


def cmd_retired_list(args: argparse.Namespace) -> int:
    with _client(args) as client:
        slot_id = _pick_slot(client, args.token)
        rows = _retired(client, slot_id)
        total = len(_profile_of(client, slot_id).retired_slots)
    for s in rows:
        print(f"{s['slot']}  {_cert_line(s['certificate'])}")
    print(f"{len(rows)} of {total} retired slots used", file=sys.stderr)
    return 0


def cmd_retired_prune(args: argparse.Namespace) -> int:
    try:
        before = dt.datetime.fromisoformat(args.before)
    except ValueError:
        raise UsageError(f"--before {args.before!r}: give a date as YYYY-MM-DD") from None
    if before.tzinfo is None:
        before = before.replace(tzinfo=dt.UTC)
    with _client(args) as client:
        slot_id = _pick_slot(client, args.token)
        victims = [
            s
            for s in _retired(client, slot_id)
            if s["certificate"] is not None
            and "not_after" in s["certificate"]
            and dt.datetime.fromisoformat(s["certificate"]["not_after"]) < before
        ]
        if not victims:
            print(f"no retired key expired before {args.before}", file=sys.stderr)
            return 0
        for s in victims:
            print(f"{s['slot']}  {_cert_line(s['certificate'])}", file=sys.stderr)
        question = (
            f"delete these {len(victims)} retired keys? "
            "Mail encrypted to them can no longer be read"
        )
        if not confirm(question, args.yes):
            return EXIT_FAILED
        session = _session(client, slot_id, args, rw=True, login=True)
        for s in victims:
            client.call(
                "tokend_DeleteKey", _with_mgmt({"h_session": session, "key_slot": s["slot"]}, args)
            )
            print(f"deleted retired key {s['slot']}", file=sys.stderr)
    return 0


def cmd_reset(args: argparse.Namespace) -> int:
    with _client(args) as client:
        slot_id = _pick_slot(client, args.token)
        status = _status(client, slot_id)
        if status["pin_retries"] != 0 or status["puk_retries"] not in (0, None):
            raise OperationFailed(
                "the token is reset only when PIN and PUK are both blocked; with a PIN use "
                "tokenctl keys delete, with the PUK tokenctl pin unblock"
            )
        if not confirm(
            f"erase every key and certificate on token {status['serial']} and restore the "
            "default PIN, PUK and management key?",
            args.yes,
        ):
            return EXIT_FAILED
        session = client.open_session(slot_id, rw=True)
        client.call("tokend_ResetToken", {"h_session": session})
    print(
        "token reset: PIN 123456, PUK 12345678, default management key; change them now",
        file=sys.stderr,
    )
    return 0


# --- parser ---------------------------------------------------------------------------------


def _token_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--token",
        help="token: serial (prefix), slot id or PKCS#11 URI (pkcs11:serial=… / token=<label>)",
    )


def _pin_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--pin-fd", type=int, metavar="FD", help="read the PIN from this file descriptor"
    )


def _mgmt_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument(
        "--mgmt-key-file", metavar="FILE", help="the current management key (hex) in FILE"
    )
    g.add_argument(
        "--mgmt-key-fd",
        type=int,
        metavar="FD",
        help="read the current management key (hex) from FD",
    )


def _slot_opt(
    p: argparse.ArgumentParser, default: str | None = None, required: bool = True
) -> None:
    p.add_argument(
        "--slot",
        required=required and default is None,
        default=default,
        help="key slot: sign|9c, encrypt|9d, auth|9a, card-auth|9e, 82-95, or pkcs11:id=%%03",
    )


def _policy_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--pin-policy", choices=("default", "never", "once", "always"))
    p.add_argument("--touch-policy", choices=("default", "never", "always", "cached"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokenctl",
        description="Inspect, use and provision hardware tokens through the tokend daemon.",
        epilog="Exit codes: 0 ok, 1 operation failed, 2 usage error. PINs are read without "
        "echo from the terminal, or from a file descriptor with --pin-fd (never from argv); "
        "one secret per line, so a new PIN can follow the old one on the same descriptor.",
    )
    parser.add_argument(
        "--socket",
        help="daemon socket (default: $TOKEND_SOCKET, else $XDG_RUNTIME_DIR/tokend/tokend.sock)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    from tokend.cli import policy_cmd  # the per-program policy lives in its own module

    policy_cmd.register(sub, _client)

    p = sub.add_parser("list", help="slots and the tokens in them")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    ble_cli.add_parser(sub)

    p = sub.add_parser("status", help="identity, PIN/PUK retries, key slots and certificates")
    p.add_argument("token", nargs="?", help="token serial (prefix), slot id or PKCS#11 URI")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    for name, func, mechs, default, what in (
        ("decrypt", cmd_decrypt, DECRYPT_MECHANISMS, "rsa-pkcs", "decrypt a key-transport blob"),
        ("sign", cmd_sign, SIGN_MECHANISMS, "sha256-rsa-pkcs", "sign data (or a digest)"),
    ):
        p = sub.add_parser(name, help=what)
        _token_opt(p)
        p.add_argument("--key", help="key: CKA_ID hex, label, PIV slot (9d, 9c, 82) or pkcs11: URI")
        p.add_argument("--mechanism", choices=sorted(mechs), default=default)
        p.add_argument("--in", dest="input", help="input file (default: stdin)")
        p.add_argument("--out", dest="output", help="output file (default: stdout)")
        _pin_opt(p)
        if name == "sign":
            p.add_argument(
                "--der", action="store_true", help="ECDSA: DER signature (as openssl wants)"
            )
        p.set_defaults(func=func)

    from tokend.cli import smime_cmd  # S/MIME lives in its own module

    smime_cmd.register(sub)

    # PIN / PUK / management key
    pin = sub.add_parser("pin", help="change or unblock the PIN").add_subparsers(
        dest="pin_command", required=True, metavar="ACTION"
    )
    p = pin.add_parser("change", help="change the PIN")
    _token_opt(p)
    _pin_opt(p)
    p.add_argument(
        "--new-pin-fd", type=int, metavar="FD", help="new PIN from FD (default: --pin-fd)"
    )
    p.set_defaults(func=cmd_pin_change)
    p = pin.add_parser("unblock", help="unblock the PIN with the PUK and set a new PIN")
    _token_opt(p)
    p.add_argument("--puk-fd", type=int, metavar="FD", help="read the PUK from FD")
    p.add_argument(
        "--new-pin-fd", type=int, metavar="FD", help="new PIN from FD (default: --puk-fd)"
    )
    p.set_defaults(func=cmd_pin_unblock)

    puk = sub.add_parser("puk", help="change the PUK").add_subparsers(
        dest="puk_command", required=True, metavar="ACTION"
    )
    p = puk.add_parser("change", help="change the PUK")
    _token_opt(p)
    p.add_argument("--puk-fd", type=int, metavar="FD", help="read the PUK from FD")
    p.add_argument(
        "--new-puk-fd", type=int, metavar="FD", help="new PUK from FD (default: --puk-fd)"
    )
    p.set_defaults(func=cmd_puk_change)

    mgmt = sub.add_parser("mgmt-key", help="set the card management key").add_subparsers(
        dest="mgmt_command", required=True, metavar="ACTION"
    )
    p = mgmt.add_parser(
        "set",
        help="set a new management key (random unless --new-key-fd); printed, or stored "
        "only in the file --store names",
    )
    _token_opt(p)
    _pin_opt(p)
    _mgmt_opts(p)
    p.add_argument("--new-key-fd", type=int, metavar="FD", help="read the new key (hex) from FD")
    p.add_argument("--algorithm", choices=sorted(MGMT_ALGORITHMS), default="tdes")
    p.add_argument("--store", metavar="FILE", help="write the new key (hex) to FILE, mode 0600")
    p.add_argument("--force", action="store_true", help="overwrite the --store file")
    p.add_argument("--require-touch", action="store_true")
    p.set_defaults(func=cmd_mgmt_key_set)

    # keys
    keys_p = sub.add_parser("keys", help="generate or delete keys").add_subparsers(
        dest="keys_command", required=True, metavar="ACTION"
    )
    p = keys_p.add_parser("generate", help="generate a key pair on the token")
    _slot_opt(p)
    p.add_argument("--alg", choices=ALGORITHMS, required=True)
    p.add_argument(
        "--public-out", metavar="FILE", help="write the public key (PEM) here (default: stdout)"
    )
    _policy_opts(p)
    _token_opt(p)
    _pin_opt(p)
    _mgmt_opts(p)
    p.set_defaults(func=cmd_keys_generate)
    p = keys_p.add_parser("delete", help="delete the key and certificate of a slot")
    _slot_opt(p)
    p.add_argument("--yes", action="store_true", help="do not ask")
    _token_opt(p)
    _pin_opt(p)
    _mgmt_opts(p)
    p.set_defaults(func=cmd_keys_delete)

    p = sub.add_parser("csr", help="a PKCS#10 request signed by the key on the token")
    _slot_opt(p)
    p.add_argument(
        "--subject", required=True, help="RFC 4514 name, e.g. 'CN=Ann Example,O=Example'"
    )
    p.add_argument("--email", action="append", help="subjectAltName e-mail (repeatable)")
    p.add_argument("--der", action="store_true", help="DER instead of PEM")
    p.add_argument("--out", help="output file (default: stdout)")
    _token_opt(p)
    _pin_opt(p)
    p.set_defaults(func=cmd_csr)

    cert = sub.add_parser("cert", help="write a certificate").add_subparsers(
        dest="cert_command", required=True, metavar="ACTION"
    )
    p = cert.add_parser("import", help="write an issued certificate (PEM or DER) into a slot")
    p.add_argument("file")
    _slot_opt(p)
    p.add_argument("--force", action="store_true", help="even if it does not match the slot's key")
    _token_opt(p)
    _pin_opt(p)
    _mgmt_opts(p)
    p.set_defaults(func=cmd_cert_import)

    certs = sub.add_parser("certs", help="export certificates").add_subparsers(
        dest="certs_command", required=True, metavar="ACTION"
    )
    p = certs.add_parser("export", help="certificates on the token (all, or one slot)")
    _slot_opt(p, required=False)
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--pem", action="store_true", help="PEM (default)")
    fmt.add_argument("--der", action="store_true", help="DER (one certificate)")
    p.add_argument("--out", help="output file (default: stdout)")
    _token_opt(p)
    p.set_defaults(func=cmd_certs_export)

    p = sub.add_parser("import-p12", help="import key and certificate from a PKCS#12 file")
    p.add_argument("file")
    _slot_opt(p, default="9d")
    p.add_argument(
        "--password-fd", type=int, metavar="FD", help="read the PKCS#12 password from FD"
    )
    _policy_opts(p)
    _token_opt(p)
    _pin_opt(p)
    _mgmt_opts(p)
    p.set_defaults(func=cmd_import_p12)

    p = sub.add_parser(
        "renew-encryption",
        help="keep the current encryption key in a retired slot and import the new PKCS#12",
    )
    p.add_argument("file")
    p.add_argument(
        "--password-fd", type=int, metavar="FD", help="read the PKCS#12 password from FD"
    )
    _token_opt(p)
    _pin_opt(p)
    _mgmt_opts(p)
    p.set_defaults(func=cmd_renew_encryption)

    retired = sub.add_parser("retired", help="retired (old encryption) keys").add_subparsers(
        dest="retired_command", required=True, metavar="ACTION"
    )
    p = retired.add_parser("list", help="retired keys and their certificates")
    _token_opt(p)
    p.set_defaults(func=cmd_retired_list)
    p = retired.add_parser(
        "prune", help="delete retired keys whose certificate expired before DATE"
    )
    p.add_argument("--before", required=True, metavar="DATE", help="YYYY-MM-DD")
    p.add_argument("--yes", action="store_true", help="do not ask")
    _token_opt(p)
    _pin_opt(p)
    _mgmt_opts(p)
    p.set_defaults(func=cmd_retired_prune)

    p = sub.add_parser("reset", help="factory reset (only when PIN and PUK are both blocked)")
    p.add_argument("--yes", action="store_true", help="do not ask")
    _token_opt(p)
    p.set_defaults(func=cmd_reset)

    p11kit_module.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "token", None) and p11uri.is_uri(args.token):
        try:
            p11uri.parse(args.token)
        except p11uri.UriError as exc:
            parser.error(str(exc))
    try:
        return int(args.func(args))
    except UsageError as exc:
        print(f"tokenctl: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except OperationFailed as exc:
        print(f"tokenctl: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return EXIT_FAILED
    except Exception as exc:
        print(f"tokenctl: {explain(exc)}", file=sys.stderr)
        return EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
