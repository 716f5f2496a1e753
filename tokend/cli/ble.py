"""`tokenctl ble pair|forget|list`: BLE keys. These talk to BlueZ directly (through the BLE
driver's agent and scanner), not to the daemon; what they change is tokend's state
(trusted keys), which a running daemon picks up at once."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import asdict

from tokend.cli.common import UsageError, fail


class TerminalPrompter:
    """tokend's agent asking on the terminal (stdin/stderr): numeric comparison or passkey
    entry. Nothing is confirmed without an explicit "y"."""

    def confirm_passkey(self, address: str, passkey: int) -> bool:
        sys.stderr.write(f"Does the key {address} show the passkey {passkey:06d}? [y/N] ")
        sys.stderr.flush()
        return sys.stdin.readline().strip().lower() in ("y", "yes")

    def enter_passkey(self, address: str) -> int:
        sys.stderr.write(f"Type the passkey the key {address} shows: ")
        sys.stderr.flush()
        text = sys.stdin.readline().strip()
        return int(text) if text.isdigit() and len(text) <= 6 else -1

    def show(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)


def _driver():  # type: ignore[no-untyped-def]
    try:
        from tokend.drivers import ble
    except ImportError as exc:
        fail(f"BLE support is not installed ({exc}): install tokend[ble]")
    return ble


def _address(ble, text: str) -> str:  # type: ignore[no-untyped-def]
    try:
        return str(ble.normalize_address(text))
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def cmd_ble_pair(args: argparse.Namespace) -> int:
    ble = _driver()
    address = _address(ble, args.address)
    prompter = TerminalPrompter()
    try:
        name = asyncio.run(
            ble.pair_key(address, prompter, scan_timeout=args.timeout, progress=prompter.show)
        )
    except ble.BleUnavailableError as exc:
        fail(str(exc))
    print(f"paired, bonded and trusted: {address} ({name or 'unnamed'})")
    return 0


def cmd_ble_forget(args: argparse.Namespace) -> int:
    ble = _driver()
    address = _address(ble, args.address)
    try:
        known = asyncio.run(ble.forget_key(address))
    except ble.BleUnavailableError as exc:
        fail(str(exc))
    if not known:
        fail(f"no BLE key {address} is known")
    print(f"forgotten: {address} (bond removed, no longer trusted)")
    return 0


def cmd_ble_list(args: argparse.Namespace) -> int:
    ble = _driver()
    print(f"scanning for {args.scan:g} s …", file=sys.stderr, flush=True)
    try:
        keys = asyncio.run(ble.list_keys(scan_time=args.scan))
    except ble.BleUnavailableError as exc:
        fail(str(exc))
    if args.json:
        print(json.dumps([asdict(k) for k in keys], indent=2))
        return 0
    if not keys:
        print("no BLE keys in range or known")
        return 0
    for key in keys:
        state = [
            "in range" if key.in_range else "not in range",
            "bonded" if key.paired and key.bonded else ("paired" if key.paired else "not paired"),
            "trusted" if key.trusted else "not trusted",
        ]
        identity = f"  token {key.identity}" if key.identity else ""
        print(f"{key.address}  {key.name or '(no name)'}: {', '.join(state)}{identity}")
    return 0


def add_parser(sub) -> None:  # type: ignore[no-untyped-def]
    ble = sub.add_parser(
        "ble",
        help="Bluetooth LE keys: pair, forget, list",
        description="Bluetooth LE keys. tokend uses a BLE key only when it is paired and "
        "bonded with authentication (tokend's own agent: passkey comparison, never Just "
        "Works) and trusted here.",
    )
    bsub = ble.add_subparsers(dest="ble_command", required=True, metavar="ACTION")
    p = bsub.add_parser("pair", help="pair, bond and trust a key (asks to compare its passkey)")
    p.add_argument("address", help="the key's Bluetooth address, XX:XX:XX:XX:XX:XX")
    p.add_argument("--timeout", type=float, default=10.0, help="seconds to look for it (10)")
    p.set_defaults(func=cmd_ble_pair)
    p = bsub.add_parser("forget", help="remove the bond and tokend's trust in a key")
    p.add_argument("address")
    p.set_defaults(func=cmd_ble_forget)
    p = bsub.add_parser("list", help="keys in range and known keys, with their state")
    p.add_argument("--scan", type=float, default=2.0, help="seconds to scan (2)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_ble_list)
