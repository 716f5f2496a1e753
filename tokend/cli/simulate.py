"""`tokend simulate piv`: a virtual PIV card plugged into pcscd through vpcd, in the
foreground until interrupted. The same building blocks as the test harness."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from tokend.simulators.demo import provision_demo
from tokend.simulators.piv import VirtualPivCard
from tokend.simulators.vpcd import VpcdCardConnection, vpcd_port, vpcd_reader_name


def make_card(
    state: Path | None, provision: str | None, export_dir: Path | None
) -> tuple[VirtualPivCard, bool]:
    """A card from ``state`` (created if missing), demo-provisioned when new or asked."""
    fresh = state is None or not state.exists()
    card = VirtualPivCard(state_file=state) if state is not None else VirtualPivCard()
    if provision == "demo" or (provision is None and fresh):
        provision_demo(card, export_dir, key_agreement=True)
        return card, True
    return card, False


def run_simulator(args: argparse.Namespace) -> int:
    card, provisioned = make_card(args.state, args.provision, args.export_dir)
    connection = VpcdCardConnection(card, reader=args.reader)
    try:
        connection.plug()
    except OSError as exc:
        print(
            f"tokend simulate: cannot reach vpcd on 127.0.0.1:{vpcd_port(args.reader)} ({exc}).\n"
            "Is pcscd running with the vpcd driver? (Debian: apt-get install pcscd "
            "vsmartcard-vpcd; then start pcscd, or use `make run`.)",
            file=sys.stderr,
        )
        return 1
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    what = "demo-provisioned " if provisioned else ""
    print(f"virtual {what}PIV card plugged into {vpcd_reader_name(args.reader)!r}", flush=True)
    if args.state:
        print(f"state file: {args.state} (unprotected test keys)", flush=True)
    if args.export_dir and provisioned:
        print(f"demo certificates written to {args.export_dir}", flush=True)
    print("Ctrl-C unplugs it.", flush=True)
    stop.wait()
    connection.unplug()
    print("unplugged", flush=True)
    return 0
