"""`tokenctl policy`: the per-program policy the daemon enforces, whether the PIN is typed
into the daemon's own prompt, and the uses it refused recently (docs/consent.md)."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Callable
from typing import Any

from tokend.client import Client


def cmd_policy(args: argparse.Namespace, connect: Callable[[argparse.Namespace], Client]) -> int:
    with connect(args) as client:
        view = client.call("tokend_GetPolicy", {})
    if args.json:
        print(json.dumps(view, indent=2))
        return 0
    pap = "on" if view["protected_authentication_path"] else "off"
    print(f"PIN prompt owned by tokend (protected authentication path): {pap}")
    if not view["enforced"]:
        print("policy: none — every program of this user may use every token")
    else:
        window = view["confirm_window"]
        print(f"policy: only these programs (one confirmation lasts {window:g} s):")
        for rule in view["rules"]:
            confirm = ", confirm each use" if rule["confirm"] else ""
            tokens = ", ".join(rule["tokens"])
            uses = ", ".join(rule["operations"])
            print(f"  {rule['program']}: {uses} on {tokens}{confirm}")
    refused = view["refused"]
    if refused:
        print("refused recently:")
        for row in refused:
            when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(row["time"]))
            print(f"  {when} {row['program'] or '?'} (pid {row['pid']}): {row['use']}")
    return 0


def register(sub: Any, connect: Callable[[argparse.Namespace], Client]) -> None:
    p = sub.add_parser(
        "policy",
        help="which programs may use the tokens, and what was refused recently",
        description="Shows the per-program policy of the daemon's configuration ([[policy]] "
        "tables), whether C_Login without a PIN opens the daemon's own PIN prompt, and the "
        "most recent refused uses with the program that asked.",
    )
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=lambda args: cmd_policy(args, connect))
