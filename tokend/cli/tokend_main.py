"""`tokend`: the daemon (`tokend serve`) and the simulators (`tokend simulate …`)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from tokend import __version__
from tokend.config import ConfigError, ServeConfig, default_config_path
from tokend.daemon import Daemon, DaemonAlreadyRunning
from tokend.p11kit import socket_path as p11kit_socket_path
from tokend.p11kit.server import P11KitServer
from tokend.wiring import SIMULATORS, TRANSPORTS

if TYPE_CHECKING:
    from tokend.registry import SlotRegistry
    from tokend.simulators.base import SimulatedToken

log = logging.getLogger("tokend")


def build_registry(cfg: ServeConfig) -> tuple[SlotRegistry, list[SimulatedToken]]:
    """Wire the configured transports and simulated tokens (`tokend.wiring` holds the
    lists of applets, transports and simulators); simulated tokens are named ``piv0``,
    ``usb0``, …"""
    from tokend.wiring import TransportOptions, applets, wire

    wired = wire(
        cfg.transports,
        applets=applets(cfg.sim_applet_aid),
        simulate=cfg.simulate,
        options=TransportOptions(
            allow_virtual_readers=cfg.allow_virtual_readers, ble_trusted=tuple(cfg.ble_trusted)
        ),
        export_dir=cfg.export_dir,
        modules=cfg.modules,
        module_paths=cfg.module_paths,
    )
    return wired.registry, list(wired.tokens)


async def serve(cfg: ServeConfig, banner: str | None = None, *, await_token: float = 0.0) -> int:
    """Run the daemon until SIGTERM/SIGINT; print ``banner`` once tokens are probed (and,
    with ``await_token``, once a token is present or that many seconds have passed)."""
    from tokend import systemd
    from tokend.session import Engine

    passed = systemd.listen_fds()  # socket activation: "tokend" (native), "pkcs11"
    native = passed.pop("tokend", None) or passed.pop("unknown", None)
    registry, tokens = build_registry(cfg)
    engine = Engine(registry, **cfg.consent())
    daemon = Daemon(engine, cfg.socket, listen_socket=native)
    control = None
    if cfg.simulate_control is not None:
        from tokend.sim_control import SimControl

        control = SimControl(cfg.simulate_control, tokens)
    try:
        if control is not None:
            await control.start()  # before the daemon: a refused path leaves nothing running
        try:
            await daemon.start()
        except BaseException:
            if control is not None:
                await control.stop()
            raise
    except DaemonAlreadyRunning as exc:
        print(f"tokend: {exc}", file=sys.stderr)
        return 1
    pkcs11 = passed.pop("pkcs11", None)
    if cfg.p11kit:
        front_end = P11KitServer(
            engine, p11kit_socket_path(daemon.socket_path), listen_socket=pkcs11
        )
        try:
            await front_end.start()
        except (DaemonAlreadyRunning, OSError) as exc:
            await daemon.stop()
            if control is not None:
                await control.stop()
            print(f"tokend: p11-kit front end: {exc}", file=sys.stderr)
            return 1
        daemon.front_ends.append(front_end)
    elif pkcs11 is not None:
        log.warning("p11kit = false: closing the pkcs11 socket systemd passed")
        pkcs11.close()
    await engine.registry.wait_settled()
    deadline = asyncio.get_running_loop().time() + await_token
    while not any(s.token_present for s in engine.registry.slots()):
        if asyncio.get_running_loop().time() > deadline:
            break
        await asyncio.sleep(0.05)  # the watcher's first report comes from its own thread
        await engine.registry.wait_settled()
    print(banner or f"tokend: listening on {daemon.socket_path}", flush=True)
    if control is not None:
        names = " ".join(t.name for t in tokens) or "none"
        print(f"TOKEND_SIMULATE_CONTROL={cfg.simulate_control}", flush=True)
        print(f"tokend: simulated tokens: {names}", flush=True)
    systemd.notify("READY=1")  # Type=notify: the tokens present at start have been probed
    try:
        await daemon.serve_until_stopped()
    finally:
        if control is not None:
            await control.stop()
    systemd.notify("STOPPING=1")
    return 0


def _config_file(given: Path | None) -> Path | None:
    """--config, else the default file when it exists (no file: the defaults)."""
    if given is not None:
        return given
    default = default_config_path()
    return default if default.exists() else None


def setup_logging(level: int) -> None:
    """One line per event; under systemd the journal adds the time, so we do not."""
    from tokend.systemd import under_journal

    fmt = "%(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=level, format=fmt if under_journal() else f"%(asctime)s {fmt}")


def cmd_check_config(args: argparse.Namespace) -> int:
    path = _config_file(args.file)
    if path is None:
        print(f"tokend: no configuration file ({default_config_path()} does not exist): defaults")
        return 0
    cfg = ServeConfig.load(path)  # raises ConfigError, located
    for warning in cfg.warnings:  # the daemon would start, but skip something
        print(warning, file=sys.stderr)
    count = len(cfg.warnings)
    print(f"{path}: OK" + (f" ({count} warning{'s' if count > 1 else ''})" if count else ""))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    cfg = ServeConfig.load(_config_file(args.config))
    if args.socket:
        cfg.socket = args.socket
    if args.simulate:
        cfg.simulate = args.simulate
    if args.allow_virtual_readers:
        cfg.allow_virtual_readers = True
    if args.transport:
        cfg.transports = args.transport
    if args.no_p11kit:
        cfg.p11kit = False
    if args.no_pcsc:
        cfg.transports = [t for t in cfg.transports if t != "pcsc"]
    if args.module:
        cfg.module_paths = list(args.module)
    cfg.export_dir = args.export_dir
    if args.simulate_control is not None:
        if not cfg.simulate:
            raise ValueError("--simulate-control needs --simulate KIND")
        cfg.simulate_control = args.simulate_control
    if cfg.simulate and not cfg.allow_simulation:
        where = cfg.source or "the configuration"
        raise ConfigError(None, None, "simulate", f"simulation is switched off in {where}")
    setup_logging(logging.DEBUG if args.verbose else getattr(logging, cfg.log_level))
    try:
        return asyncio.run(serve(cfg))
    except KeyboardInterrupt:
        return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from tokend.cli.simulate import run_simulator
    from tokend.cli.simulate_stack import run_stack

    if args.kind is None:
        setup_logging(logging.DEBUG if args.verbose else logging.WARNING)
        return run_stack(args)

    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    if args.kind == "ble":
        from tokend.cli.simulate import run_ble_simulator

        return run_ble_simulator(args)
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
    p.add_argument(
        "--config",
        type=Path,
        help="TOML configuration file (default: $XDG_CONFIG_HOME/tokend/config.toml if it "
        "exists; docs/configuration.md)",
    )
    p.add_argument(
        "--simulate",
        action="append",
        choices=sorted(SIMULATORS),
        metavar="KIND",
        help="attach an in-process, demo-provisioned virtual token (repeatable): "
        "piv = a card in an in-memory reader, sim = a SIM (IsoApplet PKI applet, T=0) in an "
        "in-memory reader, usb = a CCID token on a simulated USB bus driven through pyusb; "
        "named piv0, sim0, usb0, … on the control socket",
    )
    p.add_argument(
        "--simulate-control",
        type=Path,
        metavar="PATH",
        help="with --simulate: a 0600 Unix socket taking 'list', 'unplug NAME', "
        "'plug NAME' (one line each, one answer line each)",
    )
    p.add_argument(
        "--transport",
        action="append",
        choices=sorted(TRANSPORTS),
        metavar="NAME",
        help="watch this transport (repeatable; default from the configuration, else pcsc): "
        "pcsc = readers behind pcscd, usb = CCID tokens over USB directly (pyusb; a token "
        "pcscd holds stays with pcsc), ble = Bluetooth LE keys through BlueZ (docs/ble.md)",
    )
    p.add_argument(
        "--export-dir",
        type=Path,
        help="with --simulate: write the demo certificates and CA here (in a "
        "subdirectory per token, e.g. usb0/, when several are simulated)",
    )
    p.add_argument(
        "--allow-virtual-readers",
        action="store_true",
        help="accept vpcd 'Virtual PCD' readers (tests only: vpcd listens on "
        "every network interface)",
    )
    p.add_argument("--no-pcsc", action="store_true", help="do not watch PC/SC readers")
    p.add_argument(
        "--module",
        action="append",
        metavar="PATH",
        help="load this vendor PKCS#11 module (.so) and serve its tokens; repeatable; "
        "labelled after the file name (use [[modules]] in the configuration to choose labels)",
    )
    p.add_argument(
        "--no-p11kit",
        action="store_true",
        help="do not serve the p11-kit RPC front end (pkcs11.sock beside the socket, for "
        "p11-kit-client.so; config key p11kit = false)",
    )
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "check-config",
        help="validate a configuration file without starting",
        description="Reads the file as `tokend serve` would and reports the first problem "
        "as FILE:LINE: KEY: what is wrong (exit 1), or FILE: OK. Values inside tables are "
        "named by table and key (modules[1].timeout). What the daemon would start without "
        "(a module file that does not exist) is a FILE:LINE: KEY: warning: line (exit 0).",
    )
    p.add_argument(
        "file", nargs="?", type=Path, help="default: $XDG_CONFIG_HOME/tokend/config.toml"
    )
    p.set_defaults(func=cmd_check_config)

    from tokend.cli.simulate_stack import KINDS

    p = sub.add_parser(
        "simulate",
        help="run virtual tokens (foreground, Ctrl-C stops them)",
        description="`tokend simulate piv|sim`: one virtual card on a vpcd reader, for a "
        "daemon you run yourself; prints PCSC_READER=… (and PIV_SERIAL=… or ICCID=…), then "
        "takes plug, unplug, status, quit on stdin (EOF = quit), one line of answer each. "
        "`tokend simulate --piv [--sim …]`: those tokens, the services they need and a daemon "
        "on a private socket; prints `export NAME=value` lines and READY, then takes list, "
        "unplug NAME, plug NAME, status, quit on stdin (and on --control PATH). EOF, Ctrl-C or "
        "SIGTERM stops everything it started. `tokend simulate ble`: a virtual BLE key (PIV "
        "applet) behind a fake BlueZ on a private dbus-daemon; prints "
        "DBUS_SYSTEM_BUS_ADDRESS=… for `tokend serve --transport ble`, then takes "
        "out-of-range, in-range, kill-bluez, start-bluez, status, quit on stdin (EOF = quit), "
        "one line of answer each.",
    )
    p.add_argument(
        "kind",
        nargs="?",
        choices=["piv", "ble", "sim"],
        help="one token, for your own daemon: piv (a PIV card on a vpcd reader), ble, or sim "
        "(a SIM with the IsoApplet PKI applet, T=0, that OpenSC drives too, on a vpcd reader)",
    )
    for name in KINDS:
        p.add_argument(f"--{name}", action="store_true", help=f"a virtual {name} token")
    p.add_argument("--all", action="store_true", help="every kind of virtual token there is")
    p.add_argument(
        "--banner",
        action="store_true",
        help="use the default socket and print what to try and how to pull each token (make run)",
    )
    p.add_argument("--control", type=Path, help="also take commands on this 0600 Unix socket")
    p.add_argument("--socket", type=Path, help="the daemon's socket (default: a private one)")
    p.add_argument(
        "--reader", type=int, default=0, help="vpcd reader index: 0 = port 35963, 1 = port 35964"
    )
    p.add_argument("--state", type=Path, help="keep the card's state in this file")
    p.add_argument(
        "--provision",
        choices=["demo", "none"],
        default=None,
        help="provision a fresh card (default: demo unless --state exists); 'none' leaves a "
        "SIM blank for pkcs15-init or tokenctl",
    )
    p.add_argument("--export-dir", type=Path, help="write the demo certificates and CA here")
    p.add_argument(
        "--bus",
        metavar="ADDRESS",
        help="ble: use this D-Bus address instead of starting a private dbus-daemon",
    )
    p.add_argument(
        "--address", default="C0:FF:EE:00:00:01", help="ble: the key's Bluetooth address"
    )
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
