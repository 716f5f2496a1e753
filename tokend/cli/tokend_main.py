"""`tokend`: the daemon (`tokend serve`) and the simulators (`tokend simulate …`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tokend import __version__
from tokend.daemon import Daemon, DaemonAlreadyRunning
from tokend.paths import default_socket_path

log = logging.getLogger("tokend")


@dataclass
class ServeConfig:
    socket: Path = field(default_factory=default_socket_path)
    transports: list[str] = field(default_factory=lambda: ["pcsc"])
    simulate: list[str] = field(default_factory=list)
    allow_virtual_readers: bool = False
    log_level: str = "INFO"
    export_dir: Path | None = None
    #: PIN typed into the daemon's own pinentry (C_Login without a PIN); see docs/consent.md
    protected_authentication_path: bool = False
    pinentry_program: str | None = None
    pinentry_timeout: float = 60.0
    pinentry_tty: str | None = None
    #: per-program policy: `[[policy]]` tables and how long one confirmation lasts
    policy: list[dict[str, Any]] = field(default_factory=list)
    confirm_window: float = 300.0

    @classmethod
    def load(cls, path: Path | None) -> ServeConfig:
        cfg = cls()
        if path is None:
            return cfg
        with path.open("rb") as fh:
            data: dict[str, Any] = tomllib.load(fh)
        unknown = set(data) - {
            "socket",
            "transports",
            "simulate",
            "allow_virtual_readers",
            "log_level",
            "protected_authentication_path",
            "pinentry_program",
            "pinentry_timeout",
            "pinentry_tty",
            "policy",
            "confirm_window",
        }
        if unknown:
            raise ValueError(f"{path}: unknown settings {sorted(unknown)}")
        if "socket" in data:
            cfg.socket = Path(data["socket"])
        if "transports" in data:
            cfg.transports = list(data["transports"])
        if "simulate" in data:
            cfg.simulate = list(data["simulate"])
        cfg.allow_virtual_readers = bool(data.get("allow_virtual_readers", False))
        cfg.log_level = str(data.get("log_level", cfg.log_level))
        pap = data.get("protected_authentication_path", False)
        if not isinstance(pap, bool):
            raise ValueError(f"{path}: protected_authentication_path must be true or false")
        cfg.protected_authentication_path = pap
        for key in ("pinentry_program", "pinentry_tty"):
            if key in data:
                if not isinstance(data[key], str):
                    raise ValueError(f"{path}: {key} must be a string")
                setattr(cfg, key, data[key])
        for key in ("pinentry_timeout", "confirm_window"):
            if key in data:
                if not isinstance(data[key], int | float) or data[key] < 0:
                    raise ValueError(f"{path}: {key} must be a number of seconds")
                setattr(cfg, key, float(data[key]))
        if "policy" in data:
            cfg.policy = list(data["policy"])
        try:
            cfg.consent()  # validate the policy tables now, naming the file
        except ValueError as exc:
            raise ValueError(f"{path}: {exc}") from None
        return cfg

    def consent(self) -> dict[str, Any]:
        """The Engine's prompt and policy seams for this configuration."""
        from tokend.consent import Policy
        from tokend.pinentry import PinentryOptions, PinentryPrompter, PolicyAuthorizer

        options = PinentryOptions(self.pinentry_program, self.pinentry_timeout, self.pinentry_tty)
        policy = Policy.from_config(self.policy, self.confirm_window)
        return {
            "pin_prompter": (
                PinentryPrompter(options) if self.protected_authentication_path else None
            ),
            "authorizer": PolicyAuthorizer(policy, options) if policy.enforced else None,
        }


def build_registry(cfg: ServeConfig):  # type: ignore[no-untyped-def]
    """Wire applets and watchers. The only place that knows which drivers exist."""
    from tokend.drivers.piv import PivToken
    from tokend.registry import SlotRegistry

    registry = SlotRegistry([PivToken.open])
    for name in cfg.transports:
        if name == "pcsc":
            try:
                from tokend.drivers.pcsc import PcscWatcher
            except ImportError as exc:
                log.warning("PC/SC disabled: %s (install pyscard)", exc)
                continue
            registry.add_watcher(PcscWatcher(allow_virtual_readers=cfg.allow_virtual_readers))
        elif name in ("none", ""):
            continue
        else:
            raise ValueError(f"unknown transport {name!r} (known: pcsc)")
    for kind in cfg.simulate:
        if kind != "piv":
            raise ValueError(f"cannot simulate {kind!r} (known: piv)")
        from tokend.simulators.demo import provision_demo
        from tokend.simulators.memory import MemoryReader, MemoryWatcher
        from tokend.simulators.piv import VirtualPivCard

        card = VirtualPivCard()
        provision_demo(card, cfg.export_dir, key_agreement=True)
        reader = MemoryReader("Simulated PIV 0")
        reader.insert(card)
        registry.add_watcher(MemoryWatcher(reader))
    return registry


async def serve(cfg: ServeConfig, banner: str | None = None, *, await_token: float = 0.0) -> int:
    """Run the daemon until SIGTERM/SIGINT; print ``banner`` once tokens are probed (and,
    with ``await_token``, once a token is present or that many seconds have passed)."""
    from tokend.session import Engine

    engine = Engine(build_registry(cfg), **cfg.consent())
    daemon = Daemon(engine, cfg.socket)
    try:
        await daemon.start()
    except DaemonAlreadyRunning as exc:
        print(f"tokend: {exc}", file=sys.stderr)
        return 1
    await engine.registry.wait_settled()
    deadline = asyncio.get_running_loop().time() + await_token
    while not any(s.token_present for s in engine.registry.slots()):
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)  # the watcher's first report comes from its own thread
        await engine.registry.wait_settled()
    print(banner or f"tokend: listening on {cfg.socket}", flush=True)
    await daemon.serve_until_stopped()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = ServeConfig.load(args.config)
    if args.socket:
        cfg.socket = args.socket
    if args.simulate:
        cfg.simulate = args.simulate
    if args.allow_virtual_readers:
        cfg.allow_virtual_readers = True
    if args.no_pcsc:
        cfg.transports = [t for t in cfg.transports if t != "pcsc"]
    cfg.export_dir = args.export_dir
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else getattr(logging, cfg.log_level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        return asyncio.run(serve(cfg))
    except KeyboardInterrupt:
        return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from tokend.cli.simulate import run_simulator

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return run_simulator(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tokend",
        description="tokend: one PKCS#11-style socket API in front of your hardware keys.",
    )
    parser.add_argument(
        "-v",
        "--verbose",
        action="store_true",
        help="debug logging (never shows PINs, keys or plaintext)",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the daemon in the foreground")
    p.add_argument(
        "--socket",
        type=Path,
        help="socket path (default: $TOKEND_SOCKET, else $XDG_RUNTIME_DIR/tokend/tokend.sock)",
    )
    p.add_argument("--config", type=Path, help="TOML configuration file (see docs/)")
    p.add_argument(
        "--simulate",
        action="append",
        choices=["piv"],
        help="attach an in-process, demo-provisioned virtual token",
    )
    p.add_argument(
        "--export-dir", type=Path, help="with --simulate: write the demo certificates and CA here"
    )
    p.add_argument(
        "--allow-virtual-readers",
        action="store_true",
        help="accept vpcd 'Virtual PCD' readers (tests only: vpcd listens on "
        "every network interface)",
    )
    p.add_argument("--no-pcsc", action="store_true", help="do not watch PC/SC readers")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("simulate", help="run a virtual token (foreground, Ctrl-C stops it)")
    p.add_argument("kind", choices=["piv"], help="which token to simulate")
    p.add_argument(
        "--reader", type=int, default=0, help="vpcd reader index: 0 = port 35963, 1 = port 35964"
    )
    p.add_argument("--state", type=Path, help="keep the card's state in this file")
    p.add_argument(
        "--provision",
        choices=["demo", "none"],
        default=None,
        help="provision a fresh card (default: demo unless --state exists)",
    )
    p.add_argument("--export-dir", type=Path, help="write the demo certificates and CA here")
    p.set_defaults(func=cmd_simulate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except (ValueError, OSError) as exc:
        print(f"tokend: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
