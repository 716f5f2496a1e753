"""Mechanisms without I/O, shared by every applet driver and the session layer: RSA padding
(`rsa_padding`), the PKCS#11 mechanism tables (`tables`) and the key-pair-with-certificate
object builder and operations (`keypair`)."""

from tokend.mechanisms.keypair import (
    KeyPair,
    KeyPairToken,
    PublicKey,
    check_ecdh_params,
    digest_info,
    ecdh_kdf,
    ecdh_peer_point,
    ecdsa_input,
    ecdsa_raw_signature,
    field_len,
    key_pair_mechanisms,
    key_pair_objects,
    rsa_sign_block,
)
from tokend.mechanisms.rsa_padding import (
    DIGEST_INFO,
    mgf1,
    oaep_unpad,
    pkcs1v15_sign_pad,
    pkcs1v15_unpad,
    pss_encode,
)
from tokend.mechanisms.tables import (
    DECRYPT_MECHANISMS,
    DERIVE_MECHANISMS,
    SIGN_MECHANISMS,
    mechanism_name,
)

__all__ = [
    "DECRYPT_MECHANISMS",
    "DERIVE_MECHANISMS",
    "DIGEST_INFO",
    "SIGN_MECHANISMS",
    "KeyPair",
    "KeyPairToken",
    "PublicKey",
    "check_ecdh_params",
    "digest_info",
    "ecdh_kdf",
    "ecdh_peer_point",
    "ecdsa_input",
    "ecdsa_raw_signature",
    "field_len",
    "key_pair_mechanisms",
    "key_pair_objects",
    "mechanism_name",
    "mgf1",
    "oaep_unpad",
    "pkcs1v15_sign_pad",
    "pkcs1v15_unpad",
    "pss_encode",
    "rsa_sign_block",
]
