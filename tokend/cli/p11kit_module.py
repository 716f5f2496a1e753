"""`tokenctl p11kit-module [--install]`: the p11-kit module file that points p11-kit (and so
p11-kit-proxy.so, GnuTLS, OpenSSL through the proxy) at tokend's p11-kit front end."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from urllib.parse import quote

from tokend.p11kit import socket_path
from tokend.paths import default_socket_path

MODULE_NAME = "tokend.module"


def user_modules_dir() -> Path:
    """Where p11-kit reads a user's module files (it does not follow XDG_CONFIG_HOME)."""
    return Path.home() / ".config" / "pkcs11" / "modules"


def module_text(native_socket: Path) -> str:
    path = socket_path(native_socket.absolute())
    # p11-kit percent-decodes the address; it encodes all but these characters itself.
    address = "unix:path=" + quote(str(path), safe="/-_.\\")
    return (
        "# tokend's p11-kit front end: programs using p11-kit's module list\n"
        "# (p11-kit-proxy.so, GnuTLS, OpenSSL through the proxy) see tokend's tokens.\n"
        "# Written by `tokenctl p11kit-module`; see docs/mail-clients.md.\n"
        f"remote: {address}\n"
    )


def cmd_p11kit_module(args: argparse.Namespace) -> int:
    native = Path(args.socket) if args.socket else default_socket_path()
    text = module_text(native)
    if not args.install:
        sys.stdout.write(text)
        return 0
    target = user_modules_dir() / MODULE_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, target)
    print(f"installed {target}")
    if os.getuid() == 0:
        print(
            "note: p11-kit ignores user module files for root; as root, copy it to "
            "/etc/pkcs11/modules/ instead",
            file=sys.stderr,
        )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    p = sub.add_parser(
        "p11kit-module",
        help="print (or --install) the p11-kit module file pointing at tokend",
        description="Print the p11-kit module file whose `remote:` line points at tokend's "
        "p11-kit front end (pkcs11.sock beside the daemon socket). With --install, write it "
        f"to ~/.config/pkcs11/modules/{MODULE_NAME}, so p11-kit-proxy.so and every program "
        "using p11-kit's module list (GnuTLS, OpenSSL via the proxy) see tokend's tokens.",
    )
    p.add_argument(
        "--install",
        action="store_true",
        help=f"write ~/.config/pkcs11/modules/{MODULE_NAME} instead of printing it",
    )
    p.set_defaults(func=cmd_p11kit_module)
