"""What can go wrong with a mail message, each as one class whose text is the one line a
user reads (tokenctl prints it as is)."""

from __future__ import annotations


class SmimeError(ValueError):
    """The message cannot be handled; the text says why and, where possible, what to do."""


class CorruptMessageError(SmimeError):
    """The input is not a well-formed S/MIME / CMS message."""


class UnsupportedAlgorithmError(SmimeError):
    """The message uses an algorithm tokend does not implement (the text names it)."""


class RecipientNotPresentError(SmimeError):
    """No present token holds a key the message is encrypted to."""


class TokenRemovedError(SmimeError):
    """The token holding the key left while the message was being handled."""


class DecryptionFailedError(SmimeError):
    """A matching key was found but the message does not decrypt with it (altered or
    damaged); nothing of the content is released."""


class SignerError(SmimeError):
    """No usable signing key/certificate on the present tokens."""


class VerificationError(SmimeError):
    """The signature or the signer's chain does not verify (the text is the verdict)."""


#: What asn1crypto raises on a malformed structure. It parses lazily and is not hardened
#: against hostile DER: besides ValueError it can end in IndexError or AttributeError deep
#: inside (both found by fuzzing, docs/reliability.md); all of them mean "corrupt message".
MALFORMED = (ValueError, TypeError, KeyError, IndexError, AttributeError, OverflowError)
