"""`tokend simulate piv|sim`: a virtual PIV card or a virtual SIM plugged into pcscd through
vpcd, in the foreground; `plug`/`unplug`/`status`/`quit` on stdin, one answer line each
(design §6.1). The same building blocks as the test harness."""

from __future__ import annotations

import argparse
import re
import signal
import sys
from pathlib import Path

from tokend.simulators.base import VirtualCard
from tokend.simulators.vpcd import VpcdCardConnection, vpcd_port, vpcd_reader_name


def make_card(
    state: Path | None, provision: str | None, export_dir: Path | None
) -> tuple[VirtualCard, bool]:
    """A PIV card from ``state`` (created if missing), demo-provisioned when new or asked."""
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.piv import VirtualPivCard

    fresh = state is None or not state.exists()
    card = VirtualPivCard(state_file=state) if state is not None else VirtualPivCard()
    if provision == "demo" or (provision is None and fresh):
        provision_demo(card, export_dir, key_agreement=True)
        return card, True
    return card, False


def make_sim(
    state: Path | None, provision: str | None, export_dir: Path | None
) -> tuple[VirtualCard, bool]:
    """A virtual SIM from ``state`` (created if missing), demo-provisioned when new or asked;
    ``--provision none`` leaves a blank applet for pkcs15-init or tokenctl."""
    from tokend.simulators.sim import VirtualSim
    from tokend.simulators.sim_demo import provision_sim_demo

    fresh = state is None or not state.exists()
    if provision == "demo" and not fresh:
        raise ValueError(f"{state} already holds a SIM: remove it to provision anew")
    card = VirtualSim(state_file=state)
    if provision == "demo" or (provision is None and fresh):
        provision_sim_demo(card, export_dir)
        return card, True
    return card, False


def run_simulator(args: argparse.Namespace) -> int:
    kind = getattr(args, "kind", "piv")
    maker = make_sim if kind == "sim" else make_card
    card, provisioned = maker(args.state, args.provision, args.export_dir)
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
    what = "demo-provisioned " if provisioned else ""
    name = "SIM" if kind == "sim" else "PIV card"
    reader = vpcd_reader_name(args.reader)
    print(f"virtual {what}{name} plugged into {reader!r}", file=sys.stderr, flush=True)
    if args.state:
        print(f"state file: {args.state} (unprotected test keys)", file=sys.stderr, flush=True)
    if args.export_dir and provisioned:
        print(f"demo certificates written to {args.export_dir}", file=sys.stderr, flush=True)
    print(
        f"commands on stdin, one per line: {', '.join(CARD_COMMANDS)} (EOF or Ctrl-C: unplug "
        "and stop)",
        file=sys.stderr,
        flush=True,
    )
    # What other programs read (design §6.1): NAME=value lines on stdout.
    print(f"PCSC_READER={reader}", flush=True)
    if kind == "sim":
        print(f"ICCID={card.iccid}", flush=True)  # type: ignore[attr-defined]
    else:
        print(f"PIV_SERIAL={card.serial}", flush=True)  # type: ignore[attr-defined]

    def _stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        for line in sys.stdin:
            command = line.strip()
            if not command:
                continue
            print(_card_command(connection, reader, command), flush=True)
            if command == "quit":
                break
    except KeyboardInterrupt:
        pass
    finally:
        connection.unplug()
        print("unplugged", file=sys.stderr, flush=True)
    return 0


#: `tokend simulate piv|sim` control commands (design §6.1).
CARD_COMMANDS = ("plug", "unplug", "status", "quit")


def _card_command(connection: VpcdCardConnection, reader: str, command: str) -> str:
    """One control command, one answer line: ``ok …`` or ``error …``."""
    try:
        if command == "plug":
            if connection.is_plugged:
                return "error already plugged"
            connection.plug()
        elif command == "unplug":
            if not connection.is_plugged:
                return "error not plugged"
            connection.unplug()
        elif command == "status":
            return f"ok {'plugged' if connection.is_plugged else 'unplugged'} {reader}"
        elif command != "quit":
            return f"error unknown command {command!r} (known: {', '.join(CARD_COMMANDS)})"
    except OSError as exc:  # vpcd went away (pcscd stopped)
        return f"error {exc}"
    return f"ok {command}"


#: `tokend simulate ble` control commands (design §6.1): plug/unplug are the BLE range.
BLE_COMMANDS = ("out-of-range", "in-range", "kill-bluez", "start-bluez", "status", "quit")


def run_ble_simulator(args: argparse.Namespace) -> int:
    """A virtual BLE key (demo PIV card) behind a fake BlueZ on a private dbus-daemon (or
    ``--bus``). Prints ``DBUS_SYSTEM_BUS_ADDRESS=…`` for the daemon, then answers one line
    per control command read on stdin."""
    try:
        from tokend.simulators.ble import FakeBlueZThread, PrivateBus, VirtualBleKey
    except ImportError as exc:
        print(f"tokend simulate: BLE support is not installed ({exc})", file=sys.stderr)
        return 1
    if not re.fullmatch(r"([0-9A-Fa-f]{2}:){5}[0-9A-Fa-f]{2}", args.address):
        print(
            f"tokend simulate: --address {args.address!r} is not XX:XX:XX:XX:XX:XX", file=sys.stderr
        )
        return 2
    card, provisioned = make_card(args.state, args.provision, args.export_dir)
    bus = None
    address = args.bus
    if address is None:
        bus = PrivateBus()
        try:
            address = bus.start()
        except OSError as exc:
            print(f"tokend simulate: {exc}", file=sys.stderr)
            return 1
    key = VirtualBleKey(card, args.address)
    fake = FakeBlueZThread(address)

    def show_passkey(addr: str, passkey: int) -> None:
        print(f"key {addr} shows passkey {passkey:06d}", file=sys.stderr, flush=True)

    fake.fake.on_passkey = show_passkey

    def _stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _stop)
    try:
        fake.start()
        fake.add_key(key)
        what = "demo-provisioned " if provisioned else ""
        print(
            f"virtual BLE key {key.address} ({what}PIV) advertising on a fake BlueZ; "
            f"pair it with `tokenctl ble pair {key.address}`",
            file=sys.stderr,
            flush=True,
        )
        if args.export_dir and provisioned:
            print(f"demo certificates written to {args.export_dir}", file=sys.stderr, flush=True)
        print(f"DBUS_SYSTEM_BUS_ADDRESS={address}", flush=True)
        for line in sys.stdin:
            command = line.strip()
            if not command:
                continue
            answer = _ble_command(fake, key.address, command)
            print(answer, flush=True)
            if command == "quit":
                break
    except KeyboardInterrupt:
        pass
    finally:
        fake.stop()
        if bus is not None:
            bus.stop()
    return 0


def _ble_command(fake, address: str, command: str) -> str:  # type: ignore[no-untyped-def]
    try:
        if command in ("out-of-range", "unplug"):
            fake.out_of_range(address)
        elif command in ("in-range", "plug"):
            fake.in_range(address)
        elif command == "kill-bluez":
            if not fake.fake.running:
                return "error bluez is not running"
            fake.kill_bluez()
        elif command == "start-bluez":
            if fake.fake.running:
                return "error bluez is already running"
            fake.start_bluez()
        elif command == "status":
            state = fake.device(address)
            return (
                f"ok {'in-range' if state.in_range else 'out-of-range'} "
                f"{'connected' if state.connected else 'disconnected'} "
                f"{'bonded' if state.bonded else 'not-bonded'} "
                f"bluez-{'running' if fake.fake.running else 'stopped'}"
            )
        elif command != "quit":
            return f"error unknown command {command!r} (known: {', '.join(BLE_COMMANDS)})"
    except Exception as exc:
        return f"error {exc}"
    return f"ok {command}"
