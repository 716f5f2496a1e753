"""S/MIME for mail clients with keys that stay on the token: decrypt what other clients
send, sign, and verify — through the daemon's socket (`tokend.client`), where only the
token's part of each operation crosses (unwrap, ECDH, signature over a digest).

    with Client() as client, Keyring(client, ask_pin) as keyring:
        decrypted = decrypt(keyring, raw_message)        # any present token, retired keys too
        signed = sign(keyring, outgoing_message)          # multipart/signed by default
    verdict = verify(signed, anchors)                     # no token needed

CMS with `asn1crypto`/`cryptography`, MIME with the standard `email` package (see
`message`). Errors are `SmimeError` subclasses whose text is the one line to show a user.
"""

from tokend.smime.envelope import Decrypted, decrypt
from tokend.smime.errors import (
    CorruptMessageError,
    DecryptionFailedError,
    RecipientNotPresentError,
    SignerError,
    SmimeError,
    TokenRemovedError,
    UnsupportedAlgorithmError,
    VerificationError,
)
from tokend.smime.keys import Keyring, PinSource, TokenCert, TokenRef
from tokend.smime.signing import SignOptions, sign, signing_certificates
from tokend.smime.verifying import Verified, load_anchors, verify

__all__ = [
    "CorruptMessageError",
    "Decrypted",
    "DecryptionFailedError",
    "Keyring",
    "PinSource",
    "RecipientNotPresentError",
    "SignOptions",
    "SignerError",
    "SmimeError",
    "TokenCert",
    "TokenRef",
    "TokenRemovedError",
    "UnsupportedAlgorithmError",
    "VerificationError",
    "Verified",
    "decrypt",
    "load_anchors",
    "sign",
    "signing_certificates",
    "verify",
]
