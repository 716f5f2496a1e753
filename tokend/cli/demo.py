"""`make run`: pcscd (started if needed) + a demo-provisioned virtual PIV card on vpcd +
the daemon, in the foreground. Ctrl-C stops everything this started, by process id."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from pathlib import Path

from tokend.cli.tokend_main import ServeConfig, serve
from tokend.p11kit import socket_path as p11kit_socket_path
from tokend.paths import default_socket_path, runtime_dir
from tokend.simulators.demo import provision_demo
from tokend.simulators.pcscd import PcscdService, wait_present
from tokend.simulators.piv import VirtualPivCard
from tokend.simulators.vpcd import VpcdCardConnection

log = logging.getLogger("tokend.demo")


def main() -> int:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    socket_path = default_socket_path()
    export_dir = Path(os.environ.get("TOKEND_DEMO_DIR", runtime_dir() / "tokend" / "demo"))
    export_dir.mkdir(parents=True, exist_ok=True)
    with PcscdService() as pcscd:
        card = VirtualPivCard()
        provision_demo(card, export_dir, key_agreement=True)
        with VpcdCardConnection(card, reader=0):
            wait_present(pcscd.reader_names[0], timeout=10)
            cfg = ServeConfig(socket=socket_path, transports=["pcsc"], allow_virtual_readers=True)
            bin_dir = Path(sys.executable).parent
            origin = f"started by us, pid {pcscd.pid}" if pcscd.started else "reused"
            banner = "\n".join(
                [
                    "",
                    f"tokend is serving a demo virtual PIV card on {socket_path}",
                    f"(pcscd {origin}; demo certificates in {export_dir})",
                    "Try, in another shell:",
                    f"  export TOKEND_SOCKET={socket_path}; {bin_dir}/tokenctl list",
                    f"  openssl rand 32 > /tmp/k && openssl pkeyutl -encrypt -certin -inkey "
                    f"{export_dir}/encryption.pem -in /tmp/k -out /tmp/blob && "
                    f"echo 123456 | {bin_dir}/tokenctl decrypt --pin-fd 0 --in /tmp/blob | xxd",
                    f"  echo 'Subject: hi' | openssl cms -encrypt -aes-256-gcm -recip "
                    f"{export_dir}/encryption.pem | {bin_dir}/tokenctl smime decrypt "
                    "--pin-fd 3 - 3<<<123456",
                    "PKCS#11 programs through Debian's p11-kit-client.so (docs/mail-clients.md):",
                    f"  P11_KIT_SERVER_ADDRESS=unix:path={p11kit_socket_path(socket_path)} "
                    "pkcs11-tool --module "
                    "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so -O",
                    "Ctrl-C stops the daemon, the card and (if we started it) pcscd.",
                    "",
                ]
            )
            try:
                return asyncio.run(serve(cfg, banner, await_token=15.0))
            except KeyboardInterrupt:
                return 0


if __name__ == "__main__":
    sys.exit(main())
