"""`wipe()`: the one way tokend forgets a secret it held in a mutable buffer (PINs, PIN
blocks, private-key DER, unwrapped content-encryption keys, ECDH secrets). Python cannot
promise no copy survives elsewhere; what it can do is not keep the one it owns."""

from __future__ import annotations

__all__ = ["wipe"]


def wipe(buf: bytearray | memoryview | None) -> None:
    """Overwrite ``buf`` with zeros in place; None is allowed (nothing to forget)."""
    if buf is not None:
        buf[:] = bytes(len(buf))
