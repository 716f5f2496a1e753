"""p11-kit RPC front end: the wire codec (`codec`, pure) and the listener (`server`) that
serves the protocol of p11-kit's ``p11-kit-client.so`` from the session engine."""

from __future__ import annotations

from pathlib import Path

SOCKET_NAME = "pkcs11.sock"
#: Debian's p11-kit client module (package p11-kit-modules), what PKCS#11 programs load.
CLIENT_MODULE = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"


def socket_path(native_socket: Path) -> Path:
    """The p11-kit front end's socket: ``pkcs11.sock`` beside the native socket, in the
    same 0700 directory."""
    return native_socket.parent / SOCKET_NAME
