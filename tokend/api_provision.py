"""The provisioning extensions of the native API (docs/protocol.md §4, "Provisioning
extensions"): params decoded here, the work done by `tokend.provisioning`.

Secrets arrive as JSON strings; they are copied into bytearrays at once, and those are
wiped by the provisioning layer. (The decoded JSON strings themselves cannot be wiped in
Python; they die with the request.)"""

from __future__ import annotations

import binascii
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from tokend.api import Api, method
from tokend.errors import ArgumentsBadError
from tokend.model import KeySlotInfo
from tokend.protocol import Params, b64
from tokend.provisioning import Provisioning, SlotUsage, days_left
from tokend.session import Application

S = ("h_session", "session")
#: Names shown for attributes RFC 4514 has no short name for (as OpenSSL shows them).
_NAMES = {NameOID.EMAIL_ADDRESS: "emailAddress"}


def _provisioning(api: Api) -> Provisioning:
    prov = getattr(api, "_provisioning", None)
    if prov is None:
        prov = Provisioning(api.engine)
        api._provisioning = prov  # type: ignore[attr-defined]
    return prov


def _secret(p: Params, *names: str) -> bytearray:
    return bytearray(p.str(*names).encode())


def _hex_key(p: Params, *names: str, required: bool = False) -> bytearray | None:
    value = p.get(*names) if not required else p.str(*names)
    if value is None:
        return None
    if not isinstance(value, str):
        raise ArgumentsBadError(f'"{names[0]}" must be a hex string')
    try:
        return bytearray(binascii.unhexlify(value.strip().replace(":", "").replace(" ", "")))
    except (binascii.Error, ValueError):
        raise ArgumentsBadError(f'"{names[0]}" is not a hex string') from None


def _slot(api: Api, app: Application, handle: int, p: Params, *names: str) -> int:
    """A key slot by the token's own names (its provisioning profile), hex or "retiredN"."""
    return _provisioning(api).key_slot(app, handle, p.str(*names))


def _opt_str(p: Params, name: str) -> str | None:
    value = p.get(name)
    if value is not None and not isinstance(value, str):
        raise ArgumentsBadError(f'"{name}" must be a string')
    return value


def _certificate(der: bytes | None) -> dict[str, Any] | None:
    if der is None:
        return None
    try:
        cert = x509.load_der_x509_certificate(der)
    except ValueError:
        return {"der": b64(der), "error": "unparsable certificate"}
    return {
        "subject": cert.subject.rfc4514_string(_NAMES),
        "issuer": cert.issuer.rfc4514_string(_NAMES),
        "serial": f"{cert.serial_number:x}",
        "not_before": cert.not_valid_before_utc.isoformat(),
        "not_after": cert.not_valid_after_utc.isoformat(),
        "days_left": days_left(cert),
        "der": b64(der),
    }


def _slot_json(info: KeySlotInfo, usage: dict[str, SlotUsage]) -> dict[str, Any]:
    use = usage.get(info.slot)
    uses = (
        [] if use is None else [n for n, on in (("sign", use.sign), ("decrypt", use.decrypt)) if on]
    )
    return {
        "slot": info.slot,
        "role": info.role,
        "algorithm": info.algorithm,
        "origin": info.origin,
        "has_key": use is not None,
        "usage": uses,
        "always_authenticate": bool(use and use.always_authenticate),
        "key_id": use.key_id.hex() if use is not None else None,
        "certificate": _certificate(info.certificate),
    }


@method("tokend_GetTokenStatus")
async def _get_token_status(api: Api, app: Application, p: Params) -> dict:
    slot_id = p.int("slot_id", "slot")
    view = await _provisioning(api).status(slot_id)
    st = view.status
    usage = {u.slot: u for u in view.usage}
    return {
        "status": {
            "slot_id": slot_id,
            "generation": view.generation,
            "applet": st.identity.applet,
            "serial": st.identity.serial,
            "label": st.info.label,
            "manufacturer_id": st.info.manufacturer_id,
            "model": st.info.model,
            "version": st.version,
            "pin_retries": st.pin.pin_retries,
            "puk_retries": st.pin.puk_retries,
            "slots": [_slot_json(s, usage) for s in st.slots],
        }
    }


@method("C_SetPIN")
async def _set_pin(api: Api, app: Application, p: Params) -> dict:
    old, new = _secret(p, "p_old_pin", "old_pin"), _secret(p, "p_new_pin", "new_pin")
    await _provisioning(api).change_pin(app, p.int(*S), old, new)
    return {}


@method("tokend_ChangePuk")
async def _change_puk(api: Api, app: Application, p: Params) -> dict:
    old, new = _secret(p, "p_old_puk", "old_puk"), _secret(p, "p_new_puk", "new_puk")
    await _provisioning(api).change_puk(app, p.int(*S), old, new)
    return {}


@method("tokend_UnblockPin")
async def _unblock_pin(api: Api, app: Application, p: Params) -> dict:
    puk, new = _secret(p, "p_puk", "puk"), _secret(p, "p_new_pin", "new_pin")
    await _provisioning(api).unblock_pin(app, p.int(*S), puk, new)
    return {}


@method("tokend_SetManagementKey")
async def _set_management_key(api: Api, app: Application, p: Params) -> dict:
    handle = p.int(*S)
    algorithm = p.str("algorithm", default="tdes")
    touch = p.bool("require_touch", default=False)
    new = _hex_key(p, "new_management_key", required=True)
    current = _hex_key(p, "management_key")
    assert new is not None
    await _provisioning(api).set_management_key(app, handle, current, new, algorithm, touch)
    return {}


@method("tokend_GenerateKeyPair")
async def _generate_key_pair(api: Api, app: Application, p: Params) -> dict:
    handle = p.int(*S)
    slot = _slot(api, app, handle, p, "key_slot")
    algorithm = p.str("algorithm")
    pin_policy, touch_policy = _opt_str(p, "pin_policy"), _opt_str(p, "touch_policy")
    mgmt = _hex_key(p, "management_key")
    public = await _provisioning(api).generate_key(
        app, handle, slot, algorithm, mgmt, pin_policy, touch_policy
    )
    return {"public_key": b64(public), "key_slot": f"{slot:02x}"}


@method("tokend_ImportKey")
async def _import_key(api: Api, app: Application, p: Params) -> dict:
    handle = p.int(*S)
    slot = _slot(api, app, handle, p, "key_slot")
    cert = p.bytes("certificate") if p.get("certificate") is not None else None
    pin_policy, touch_policy = _opt_str(p, "pin_policy"), _opt_str(p, "touch_policy")
    private_key = bytearray(p.bytes("private_key"))
    mgmt = _hex_key(p, "management_key")
    await _provisioning(api).import_key(
        app, handle, slot, private_key, cert, mgmt, pin_policy, touch_policy
    )
    return {"key_slot": f"{slot:02x}"}


@method("tokend_PutCertificate")
async def _put_certificate(api: Api, app: Application, p: Params) -> dict:
    handle = p.int(*S)
    slot = _slot(api, app, handle, p, "key_slot")
    cert = p.bytes("certificate")
    force = p.bool("force", default=False)
    mgmt = _hex_key(p, "management_key")
    await _provisioning(api).put_certificate(app, handle, slot, cert, mgmt, force)
    return {"key_slot": f"{slot:02x}"}


@method("tokend_DeleteKey")
async def _delete_key(api: Api, app: Application, p: Params) -> dict:
    handle = p.int(*S)
    slot = _slot(api, app, handle, p, "key_slot")
    keep = p.bool("keep_certificate", default=False)
    mgmt = _hex_key(p, "management_key")
    await _provisioning(api).delete_key(app, handle, slot, mgmt, keep)
    return {}


@method("tokend_MoveKey")
async def _move_key(api: Api, app: Application, p: Params) -> dict:
    handle = p.int(*S)
    src, dst = _slot(api, app, handle, p, "from_slot"), _slot(api, app, handle, p, "to_slot")
    mgmt = _hex_key(p, "management_key")
    await _provisioning(api).move_key(app, handle, src, dst, mgmt)
    return {}


@method("tokend_RenewKey")
async def _renew_key(api: Api, app: Application, p: Params) -> dict:
    handle = p.int(*S)
    name = p.get("key_slot")
    slot = _provisioning(api).key_slot(app, handle, name if isinstance(name, str) else None)
    cert = p.bytes("certificate")
    private_key = bytearray(p.bytes("private_key"))
    mgmt = _hex_key(p, "management_key")
    result = await _provisioning(api).renew_key(app, handle, slot, private_key, cert, mgmt)
    return {"key_slot": f"{slot:02x}", "retired_slot": result.retired_slot}


@method("tokend_ResetToken")
async def _reset_token(api: Api, app: Application, p: Params) -> dict:
    await _provisioning(api).reset(app, p.int(*S))
    return {}


@method("tokend_GetPolicy")
async def _get_policy(api: Api, app: Application, p: Params) -> dict:
    """The per-program policy in force and the most recent refusals (`tokenctl policy`)."""
    authorizer = api.engine.authorizer
    describe = getattr(authorizer, "describe", None)
    view = describe() if describe is not None else {"enforced": False, "rules": [], "refused": []}
    view["protected_authentication_path"] = api.engine.protected_authentication_path
    view["you"] = {"pid": app.client.pid, "program": app.client.exe}
    return view
