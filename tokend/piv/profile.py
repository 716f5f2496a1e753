"""The PIV provisioning profile: what `tokend.provisioning` and `tokenctl` need to know about
a PIV token (key slots, the retired pool, algorithms, the management key), supplied by the
PIV driver (`PivToken.profile`) and listed in `tokend.wiring.PROFILES`. Pure values."""

from __future__ import annotations

from tokend.model import ProvisioningProfile
from tokend.piv.codes import (
    DEFAULT_MANAGEMENT_KEY,
    DELETE_KEY,
    KEY_SLOTS,
    MGMT_KEY_LENGTHS,
    RETIRED_SLOTS,
    SLOT_ALIASES,
    PinPolicy,
    PivAlgorithm,
    PivSlot,
    TouchPolicy,
)

__all__ = ["PIV_PROFILE", "parse_slot"]


def _mgmt(alg: PivAlgorithm) -> tuple[int, int]:
    return int(alg), MGMT_KEY_LENGTHS[alg]


PIV_PROFILE = ProvisioningProfile(
    applet="PIV",
    key_slots=tuple(int(s) for s in KEY_SLOTS),
    key_slot_names=SLOT_ALIASES,
    retired_slots=tuple(int(s) for s in RETIRED_SLOTS),
    encryption_slot=PivSlot.KEY_MANAGEMENT,
    signature_slot=PivSlot.SIGNATURE,
    delete_ref=DELETE_KEY,
    algorithms={
        "rsa1024": PivAlgorithm.RSA_1024,
        "rsa2048": PivAlgorithm.RSA_2048,
        "rsa3072": PivAlgorithm.RSA_3072,
        "rsa4096": PivAlgorithm.RSA_4096,
        "p256": PivAlgorithm.ECC_P256,
        "p384": PivAlgorithm.ECC_P384,
    },
    rsa_sizes=(1024, 2048, 3072, 4096),
    ec_curves=("secp256r1", "secp384r1"),
    admin_credential="management key",
    admin_algorithms={
        "tdes": _mgmt(PivAlgorithm.TDES),
        "aes128": _mgmt(PivAlgorithm.AES_128),
        "aes192": _mgmt(PivAlgorithm.AES_192),
        "aes256": _mgmt(PivAlgorithm.AES_256),
    },
    default_admin_key=DEFAULT_MANAGEMENT_KEY,
    pin_policies={
        "default": PinPolicy.DEFAULT,
        "never": PinPolicy.NEVER,
        "once": PinPolicy.ONCE,
        "always": PinPolicy.ALWAYS,
        "match-once": PinPolicy.MATCH_ONCE,
        "match-always": PinPolicy.MATCH_ALWAYS,
    },
    touch_policies={
        "default": TouchPolicy.DEFAULT,
        "never": TouchPolicy.NEVER,
        "always": TouchPolicy.ALWAYS,
        "cached": TouchPolicy.CACHED,
    },
    slot_hint="9a, 9c, 9d, 9e or 82-95",
    key_ids={int(s): s.cka_id for s in KEY_SLOTS},
)


def parse_slot(name: str) -> int:
    """A PIV key slot from its name: "sign", "encrypt", "auth", "card-auth", "retiredN"
    (1-20) or hex ("9d", "82"). ValueError for anything else."""
    return PIV_PROFILE.parse_key_slot(name)
