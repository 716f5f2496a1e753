"""The PKCS#11 mechanism tables: which mechanism hashes with what, which ones decrypt, sign
or derive. One copy: the session layer checks operations against the same sets the drivers
implement. Pure values."""

from __future__ import annotations

from cryptography.hazmat.primitives import hashes

from tokend.pkcs11 import CKD, CKG, CKM

__all__ = [
    "DECRYPT_MECHANISMS",
    "DERIVE_MECHANISMS",
    "ECDSA_HASHED",
    "EC_SIGN_MECHANISMS",
    "HASH_OF_CKM",
    "HASH_OF_MGF",
    "KDF_HASHES",
    "RSA_PKCS_HASHED",
    "RSA_PSS_HASHED",
    "RSA_SIGN_MECHANISMS",
    "SIGN_MECHANISMS",
    "mechanism_name",
]

#: hashlib names of the PKCS#11 hash mechanisms (OAEP/PSS hash_alg).
HASH_OF_CKM = {
    CKM.CKM_SHA_1: "sha1",
    CKM.CKM_SHA256: "sha256",
    CKM.CKM_SHA384: "sha384",
    CKM.CKM_SHA512: "sha512",
}
HASH_OF_MGF = {
    CKG.CKG_MGF1_SHA1: "sha1",
    CKG.CKG_MGF1_SHA256: "sha256",
    CKG.CKG_MGF1_SHA384: "sha384",
    CKG.CKG_MGF1_SHA512: "sha512",
}
#: Mechanisms whose input the host hashes before the card sees it (they may come in parts).
RSA_PKCS_HASHED = {
    CKM.CKM_SHA1_RSA_PKCS: "sha1",
    CKM.CKM_SHA256_RSA_PKCS: "sha256",
    CKM.CKM_SHA384_RSA_PKCS: "sha384",
    CKM.CKM_SHA512_RSA_PKCS: "sha512",
}
RSA_PSS_HASHED = {
    CKM.CKM_SHA1_RSA_PKCS_PSS: "sha1",
    CKM.CKM_SHA256_RSA_PKCS_PSS: "sha256",
    CKM.CKM_SHA384_RSA_PKCS_PSS: "sha384",
    CKM.CKM_SHA512_RSA_PKCS_PSS: "sha512",
}
ECDSA_HASHED = {
    CKM.CKM_ECDSA_SHA256: "sha256",
    CKM.CKM_ECDSA_SHA384: "sha384",
    CKM.CKM_ECDSA_SHA512: "sha512",
}
KDF_HASHES: dict[CKD, type[hashes.HashAlgorithm]] = {
    CKD.CKD_SHA1_KDF: hashes.SHA1,
    CKD.CKD_SHA256_KDF: hashes.SHA256,
    CKD.CKD_SHA384_KDF: hashes.SHA384,
    CKD.CKD_SHA512_KDF: hashes.SHA512,
}
DECRYPT_MECHANISMS = frozenset({CKM.CKM_RSA_PKCS, CKM.CKM_RSA_PKCS_OAEP, CKM.CKM_RSA_X_509})
DERIVE_MECHANISMS = frozenset({CKM.CKM_ECDH1_DERIVE})
RSA_SIGN_MECHANISMS = frozenset(
    {CKM.CKM_RSA_PKCS, CKM.CKM_RSA_PKCS_PSS, *RSA_PKCS_HASHED, *RSA_PSS_HASHED}
)
EC_SIGN_MECHANISMS = frozenset({CKM.CKM_ECDSA, *ECDSA_HASHED})
SIGN_MECHANISMS = RSA_SIGN_MECHANISMS | EC_SIGN_MECHANISMS


def mechanism_name(mech: int) -> str:
    """The CKM name for messages; unknown numbers are kept, in hex."""
    try:
        return CKM(mech).name
    except ValueError:
        return f"mechanism 0x{mech:X}"
