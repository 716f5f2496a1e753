"""The SIM provisioning profile: what `tokend.provisioning` and `tokenctl` need to know about
a SIM with the legacy IsoApplet, supplied by the SIM driver (`SimToken.profile`) and listed
in `tokend.wiring.PROFILES`. Pure values.

The applet has sixteen key references (0-15) and no management key: the PIN protects
provisioning. tokend's convention (and the demo's): 0 holds the encryption key, 1 the
signing key, 2-15 retired encryption keys. RSA-2048 only (the legacy applet's one size)."""

from __future__ import annotations

from tokend.model import ProvisioningProfile
from tokend.sim.codes import KEY_REFERENCES, Alg

__all__ = [
    "DELETE_KEY",
    "ENCRYPTION_REF",
    "RETIRED_REFS",
    "SIGNING_REF",
    "SIM_PROFILE",
    "role",
]

ENCRYPTION_REF, SIGNING_REF = 0, 1
RETIRED_REFS = tuple(range(2, 16))
#: `move_key` destination that deletes the key (no key reference has this number).
DELETE_KEY = 0xFF

SIM_PROFILE = ProvisioningProfile(
    applet="SIM-PKI",
    key_slots=tuple(KEY_REFERENCES),
    key_slot_names={
        "encrypt": ENCRYPTION_REF,
        "encryption": ENCRYPTION_REF,
        "sign": SIGNING_REF,
        "signature": SIGNING_REF,
    },
    retired_slots=RETIRED_REFS,
    encryption_slot=ENCRYPTION_REF,
    signature_slot=SIGNING_REF,
    delete_ref=DELETE_KEY,
    algorithms={"rsa2048": Alg.GEN_RSA_2048},
    rsa_sizes=(2048,),
    ec_curves=(),
    admin_credential="PIN (a SIM has no management key)",
    admin_algorithms={},
    # No admin key: provisioning is allowed to an application logged in with the PIN.
    default_admin_key=b"",
    slot_hint="encrypt (00), sign (01), retired 02-0f",
)


def role(ref: int) -> tuple[str, frozenset[str], str]:
    """Label, PKCS#15 usage and role of key reference ``ref`` by tokend's convention (the
    demo and tokenctl write these; OpenSC shows the labels)."""
    if ref == ENCRYPTION_REF:
        return "Encryption key", frozenset({"decrypt", "unwrap"}), "encryption"
    if ref == SIGNING_REF:
        return "Signing key", frozenset({"sign", "nonRepudiation"}), "signature"
    number = RETIRED_REFS.index(ref) + 1 if ref in RETIRED_REFS else ref
    return f"Retired encryption key {number}", frozenset({"decrypt", "unwrap"}), "retired"
