"""The native API: each JSON-RPC method mapped onto the session engine. Params are decoded
here (protocol codecs), results encoded; the engine never sees JSON."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from tokend import __version__
from tokend.errors import MechanismInvalidError
from tokend.pkcs11 import CKF_MECH, CKF_SESSION, CKF_WAIT, CKM, CKU
from tokend.protocol import (
    PROTOCOL_VERSION,
    Params,
    b64,
    decode_attribute_types,
    decode_mechanism,
    decode_template,
    encode_attributes,
    flag_names,
)
from tokend.session import Application, Engine

Handler = Callable[["Api", Application, Params], Awaitable[Any]]
METHODS: dict[str, Handler] = {}

S = ("h_session", "session")
#: Notifications held for a subscriber that does not read; newer ones are dropped.
_NOTIFY_QUEUE = 256


def method(name: str) -> Callable[[Handler], Handler]:
    def register(fn: Handler) -> Handler:
        METHODS[name] = fn
        return fn

    return register


def _version(v: tuple[int, int]) -> dict[str, int]:
    return {"major": v[0], "minor": v[1]}


class Api:
    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    async def call(self, app: Application, name: str, params: Params) -> Any:
        handler = METHODS.get(name)
        if handler is None:
            raise KeyError(name)
        return await handler(self, app, params)


# --- general ------------------------------------------------------------------------------


@method("C_Initialize")
async def _initialize(api: Api, app: Application, p: Params) -> dict:
    return {}


@method("C_Finalize")
async def _finalize(api: Api, app: Application, p: Params) -> dict:
    await api.engine.finalize(app)
    return {}


@method("C_GetInfo")
async def _get_info(api: Api, app: Application, p: Params) -> dict:
    major, minor = (int(x) for x in __version__.split(".")[:2])
    return {
        "info": {
            "cryptoki_version": {"major": 2, "minor": 40},
            "manufacturer_id": "tokend",
            "flags": [],
            "library_description": "tokend native socket API",
            "library_version": {"major": major, "minor": minor},
            "protocol_version": PROTOCOL_VERSION,
        }
    }


@method("C_GetSlotList")
async def _get_slot_list(api: Api, app: Application, p: Params) -> dict:
    present = p.bool("token_present", default=False)
    return {"slot_list": api.engine.slot_list(present)}


@method("C_GetSlotInfo")
async def _get_slot_info(api: Api, app: Application, p: Params) -> dict:
    info = api.engine.slot_info(p.int("slot_id", "slot"))
    return {
        "info": {
            "slot_description": info.description,
            "manufacturer_id": info.manufacturer_id,
            "flags": flag_names(info.flags),
            "hardware_version": _version((1, 0)),
            "firmware_version": _version((1, 0)),
        }
    }


@method("C_GetTokenInfo")
async def _get_token_info(api: Api, app: Application, p: Params) -> dict:
    state = api.engine.token_state(p.int("slot_id", "slot"))
    info = state.info
    return {
        "info": {
            "label": info.label,
            "manufacturer_id": info.manufacturer_id,
            "model": info.model,
            "serial_number": info.serial_number,
            "flags": flag_names(state.flags),
            # Per application (PKCS#11's meaning): the daemon's per-connection limit.
            "max_session_count": state.max_session_count,
            "session_count": state.session_count,
            "max_rw_session_count": state.max_session_count,
            "rw_session_count": state.rw_session_count,
            "max_pin_len": info.max_pin_len,
            "min_pin_len": info.min_pin_len,
            "hardware_version": _version(info.hardware_version),
            "firmware_version": _version(info.firmware_version),
            "generation": state.generation,
            "token_serial": state.serial,
            "applet": api.engine.registry.instance(p.int("slot_id", "slot")).token.identity.applet,
        }
    }


@method("C_GetMechanismList")
async def _get_mechanism_list(api: Api, app: Application, p: Params) -> dict:
    mechanisms = api.engine.mechanisms(p.int("slot_id", "slot"))
    return {"mechanism_list": [m.mechanism.name for m in mechanisms]}


@method("C_GetMechanismInfo")
async def _get_mechanism_info(api: Api, app: Application, p: Params) -> dict:
    slot_id = p.int("slot_id", "slot")
    api.engine.registry.instance(slot_id)  # CKR_TOKEN_NOT_PRESENT before a bad name
    try:
        mech = p.enum(CKM, "type", "mechanism")
    except Exception:
        raise MechanismInvalidError(f"unknown mechanism {p.get('type', 'mechanism')!r}") from None
    info = api.engine.mechanism_info(slot_id, mech)
    return {
        "info": {
            "min_key_size": info.min_key_size,
            "max_key_size": info.max_key_size,
            "flags": flag_names(CKF_MECH(info.flags)),
        }
    }


# --- sessions -----------------------------------------------------------------------------


@method("C_OpenSession")
async def _open_session(api: Api, app: Application, p: Params) -> dict:
    flags = p.flags(CKF_SESSION, "flags", default=int(CKF_SESSION.CKF_SERIAL_SESSION))
    handle = api.engine.open_session(app, p.int("slot_id", "slot"), flags)
    return {"h_session": handle}


@method("C_CloseSession")
async def _close_session(api: Api, app: Application, p: Params) -> dict:
    await api.engine.close_session(app, p.int(*S))
    return {}


@method("C_CloseAllSessions")
async def _close_all_sessions(api: Api, app: Application, p: Params) -> dict:
    await api.engine.close_all_sessions(app, p.int("slot_id", "slot"))
    return {}


@method("C_GetSessionInfo")
async def _get_session_info(api: Api, app: Application, p: Params) -> dict:
    info = api.engine.session_info(app, p.int(*S))
    return {
        "info": {
            "slot_id": info["slot_id"],
            "state": info["state"].name,  # type: ignore[attr-defined]
            "flags": flag_names(info["flags"]),  # type: ignore[arg-type]
            "device_error": 0,
        }
    }


@method("C_Login")
async def _login(api: Api, app: Application, p: Params) -> dict:
    user = p.enum(CKU, "user_type", default="CKU_USER")
    # No PIN (absent or null): the protected authentication path — the daemon prompts.
    text = p.get("p_pin", "pin")
    pin = None if text is None else bytearray(p.str("p_pin", "pin").encode())
    await api.engine.login(app, p.int(*S), user, pin)
    return {}


@method("C_Logout")
async def _logout(api: Api, app: Application, p: Params) -> dict:
    await api.engine.logout(app, p.int(*S))
    return {}


# --- objects ------------------------------------------------------------------------------


@method("C_FindObjectsInit")
async def _find_objects_init(api: Api, app: Application, p: Params) -> dict:
    template = decode_template(p.get("p_template", "template"))
    api.engine.find_objects_init(app, p.int(*S), template)
    return {}


@method("C_FindObjects")
async def _find_objects(api: Api, app: Application, p: Params) -> dict:
    count = p.int("ul_max_object_count", "max_object_count", default=1 << 30)
    return {"h_object": api.engine.find_objects(app, p.int(*S), count)}


@method("C_FindObjectsFinal")
async def _find_objects_final(api: Api, app: Application, p: Params) -> dict:
    api.engine.find_objects_final(app, p.int(*S))
    return {}


@method("C_GetAttributeValue")
async def _get_attribute_value(api: Api, app: Application, p: Params) -> dict:
    types = decode_attribute_types(p.get("p_template", "template"))
    values = api.engine.get_attributes(app, p.int(*S), p.int("h_object", "object"), types)
    return {"template": encode_attributes(values)}


@method("C_DestroyObject")
async def _destroy_object(api: Api, app: Application, p: Params) -> dict:
    api.engine.destroy_object(app, p.int(*S), p.int("h_object", "object"))
    return {}


# --- crypto -------------------------------------------------------------------------------


@method("C_DecryptInit")
async def _decrypt_init(api: Api, app: Application, p: Params) -> dict:
    mech = decode_mechanism(p.get("p_mechanism", "mechanism"))
    api.engine.decrypt_init(app, p.int(*S), mech, p.int("h_key", "key"))
    return {}


@method("C_Decrypt")
async def _decrypt(api: Api, app: Application, p: Params) -> dict:
    data = p.bytes("p_encrypted_data", "encrypted_data")
    return {"data": b64(await api.engine.decrypt(app, p.int(*S), data))}


@method("C_SignInit")
async def _sign_init(api: Api, app: Application, p: Params) -> dict:
    mech = decode_mechanism(p.get("p_mechanism", "mechanism"))
    api.engine.sign_init(app, p.int(*S), mech, p.int("h_key", "key"))
    return {}


@method("C_Sign")
async def _sign(api: Api, app: Application, p: Params) -> dict:
    data = p.bytes("p_data", "data")
    return {"signature": b64(await api.engine.sign(app, p.int(*S), data))}


@method("C_SignUpdate")
async def _sign_update(api: Api, app: Application, p: Params) -> dict:
    api.engine.sign_update(app, p.int(*S), p.bytes("p_part", "part"))
    return {}


@method("C_SignFinal")
async def _sign_final(api: Api, app: Application, p: Params) -> dict:
    return {"signature": b64(await api.engine.sign_final(app, p.int(*S)))}


@method("C_DeriveKey")
async def _derive_key(api: Api, app: Application, p: Params) -> dict:
    mech = decode_mechanism(p.get("p_mechanism", "mechanism"))
    template = decode_template(p.get("p_template", "template"))
    handle = await api.engine.derive_key(
        app, p.int(*S), mech, p.int("h_base_key", "base_key"), template
    )
    return {"h_key": handle}


# --- events -------------------------------------------------------------------------------


@method("C_WaitForSlotEvent")
async def _wait_for_slot_event(api: Api, app: Application, p: Params) -> dict:
    flags = p.flags(CKF_WAIT, "flags", default=0)
    dont_block = bool(flags & CKF_WAIT.CKF_DONT_BLOCK)
    try:
        slot = await api.engine.wait_for_slot_event(app, dont_block)
    except asyncio.CancelledError:
        from tokend.errors import FunctionCanceledError

        raise FunctionCanceledError("cancelled") from None
    return {"slot": slot}


@method("subscribe")
async def _subscribe(api: Api, app: Application, p: Params) -> dict:
    """tokend extension: deliver `slot_event` notifications on this connection."""
    if app.notify is None:
        app.notify = asyncio.Queue(maxsize=_NOTIFY_QUEUE)
    app.subscribed.set()
    return {"subscribed": True}


@method("unsubscribe")
async def _unsubscribe(api: Api, app: Application, p: Params) -> dict:
    queue, app.notify = app.notify, None
    app.subscribed.clear()
    if queue is not None:
        queue.put_nowait(None)  # wakes the notifier parked on it (a later subscribe has a new one)
    return {"subscribed": False}


import tokend.api_provision  # noqa: E402,F401  (registers the provisioning extensions)
