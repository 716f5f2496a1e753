"""The one list of applets and transports, and the function that wires them into a
`SlotRegistry`. Used by the daemon (`tokend serve`), the in-process test daemon
(`tokend.testing`) and the benchmarks (`bench/launcher.py`), so a new token kind is added
here once and every one of them gets it.

* `APPLETS` — token openers, asked in order for every card that arrives; the first that
  recognises the card (returns a token, not None) wins. Put specific applets before
  generic ones.
* `TRANSPORTS` — transport name (as in ``--transport`` and the config's ``transports``)
  → a factory of its `Watcher`. The factory imports its transport module lazily, so a
  missing optional library (pyscard, pyusb, bleak) disables only that transport.
* `SIMULATORS` — ``--simulate`` kinds → a factory of a watcher holding one
  demo-provisioned virtual token in an in-process reader.
* `module_watchers` — one watcher per vendor PKCS#11 module (``[[modules]]`` tables and
  ``--module PATH``); each brings its own opener (the module is the applet), so `APPLETS`
  never sees a module slot.

Rank 2 (beside the registry): it imports drivers and simulators, never the session layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokend.drivers.base import Watcher
from tokend.drivers.piv import PivToken
from tokend.drivers.sim import SimToken
from tokend.model import ProvisioningProfile
from tokend.registry import AppletOpener, SlotRegistry
from tokend.simulators.base import SimulatedToken

log = logging.getLogger(__name__)

__all__ = [
    "APPLETS",
    "PROFILES",
    "SIMULATORS",
    "TRANSPORTS",
    "TransportOptions",
    "Wired",
    "applets",
    "build_registry",
    "make_watcher",
    "module_watchers",
    "wire",
]

#: Token openers in the order they are asked (a card is the first one's that accepts it).
APPLETS: tuple[AppletOpener, ...] = (PivToken.open, SimToken.open)


def applets(sim_aid: bytes | None = None) -> tuple[AppletOpener, ...]:
    """`APPLETS`, with the SIM applet selected by ``sim_aid`` when one is configured
    (`sim_applet_aid`: a SIM whose PKI applet was loaded under another AID)."""
    if sim_aid is None:
        return APPLETS
    return tuple(SimToken.opener(aid=sim_aid) if a == SimToken.open else a for a in APPLETS)


#: Provisioning profiles by applet name (`TokenIdentity.applet`), for tools that provision
#: a token they reach only through the daemon.
PROFILES: dict[str, ProvisioningProfile] = {
    "PIV": PivToken.profile,
    "SIM-PKI": SimToken.profile,
}


@dataclass(frozen=True, slots=True)
class TransportOptions:
    """Settings a transport factory may use (from the command line / config file)."""

    allow_virtual_readers: bool = False
    #: BLE keys trusted by the configuration: ``[[ble_trusted]]`` tables (address,
    #: identity, label) or plain addresses; `tokenctl ble pair` adds more in tokend's state.
    ble_trusted: tuple[Mapping[str, Any] | str, ...] = ()


TransportFactory = Callable[[TransportOptions], Watcher]


def _pcsc(options: TransportOptions) -> Watcher:
    from tokend.drivers.pcsc import PcscWatcher

    return PcscWatcher(allow_virtual_readers=options.allow_virtual_readers)


def _usb(options: TransportOptions) -> Watcher:
    from tokend.drivers.usb_ccid import UsbCcidWatcher

    return UsbCcidWatcher()


def _ble(options: TransportOptions) -> Watcher:
    from tokend.drivers.ble import BleWatcher

    return BleWatcher(trusted=options.ble_trusted)


#: Transport name → watcher factory. Names are what ``--transport`` and the config's
#: ``transports`` list accept; "none" (or "") means no transport.
TRANSPORTS: dict[str, TransportFactory] = {
    "pcsc": _pcsc,
    "usb": _usb,
    "ble": _ble,
}
#: What to call a transport and how to get it, said when its import fails.
_LABELS = {"pcsc": "PC/SC", "usb": "direct USB", "ble": "Bluetooth LE"}
_INSTALL_HINTS = {
    "pcsc": "install pyscard",
    "usb": "install tokend[usb]",
    "ble": "install tokend[ble]",
}

#: factory(export dir or None, token name "piv0", index among its kind) → (watcher, the
#: token a control socket plugs and unplugs)
SimulatorFactory = Callable[[Path | None, str, int], tuple[Watcher, SimulatedToken]]


def _simulated_piv(
    export_dir: Path | None, name: str, index: int
) -> tuple[Watcher, SimulatedToken]:
    """A demo card in the in-process reader."""
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.memory import MemoryReader, MemoryToken, MemoryWatcher
    from tokend.simulators.piv import VirtualPivCard

    card = VirtualPivCard()
    provision_demo(card, export_dir, key_agreement=True)
    reader = MemoryReader(f"Simulated PIV {index}")
    reader.insert(card)
    return MemoryWatcher(reader), MemoryToken(name, reader, card)


def _simulated_usb(
    export_dir: Path | None, name: str, index: int
) -> tuple[Watcher, SimulatedToken]:
    """A demo card in a virtual CCID token on its own simulated USB bus, reached through
    pyusb and the real USB CCID driver (the bus is pyusb's backend)."""
    from tokend.drivers.usb_ccid import UsbCcidWatcher
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.piv import VirtualPivCard
    from tokend.simulators.usb_ccid import SimulatedUsbBus, SimulatedUsbToken, VirtualCcidToken

    card = VirtualPivCard()
    provision_demo(card, export_dir, key_agreement=True)
    bus = SimulatedUsbBus(bus_number=index + 1)
    token = SimulatedUsbToken(name, bus, VirtualCcidToken(card, serial=f"{index:04d}"))
    token.plug()
    return UsbCcidWatcher(backend=bus, hotplug=bus, name="usb-sim"), token


def _simulated_sim(
    export_dir: Path | None, name: str, index: int
) -> tuple[Watcher, SimulatedToken]:
    """A demo SIM (IsoApplet on a T=0 UICC) in the in-process reader."""
    from tokend.simulators.memory import MemoryReader, MemoryToken, MemoryWatcher
    from tokend.simulators.sim import VirtualSim
    from tokend.simulators.sim_demo import provision_sim_demo

    card = VirtualSim()
    provision_sim_demo(card, export_dir)
    reader = MemoryReader(f"Simulated SIM {index}")
    reader.insert(card)
    return MemoryWatcher(reader), MemoryToken(name, reader, card)


#: ``--simulate`` kind → factory of a watcher with one demo-provisioned virtual token.
SIMULATORS: dict[str, SimulatorFactory] = {
    "piv": _simulated_piv,
    "usb": _simulated_usb,
    "sim": _simulated_sim,
}


def module_watchers(
    tables: Sequence[Mapping[str, Any]] = (), paths: Sequence[str] = ()
) -> list[Watcher]:
    """One watcher per vendor PKCS#11 module: configuration tables first, then ``--module``
    paths. Without python-pkcs11 (``tokend[module]``) the modules are skipped, logged once."""
    if not tables and not paths:
        return []
    try:
        from tokend.drivers.pkcs11_module import ModuleWatcher, module_configs
    except ImportError as exc:
        log.error("PKCS#11 modules disabled: %s (install tokend[module])", exc)
        return []
    return [ModuleWatcher(cfg) for cfg in module_configs(paths, [dict(t) for t in tables])]


def make_watcher(name: str, options: TransportOptions | None = None) -> Watcher | None:
    """The watcher of transport ``name``; None for "none"/"" or when its library is not
    installed (logged). ValueError for an unknown name."""
    if name in ("none", ""):
        return None
    factory = TRANSPORTS.get(name)
    if factory is None:
        raise ValueError(f"unknown transport {name!r} (known: {', '.join(TRANSPORTS)})")
    try:
        return factory(options or TransportOptions())
    except ImportError as exc:
        label = _LABELS.get(name, name)
        hint = _INSTALL_HINTS.get(name, "install its optional dependency")
        log.warning("%s disabled: %s (%s)", label, exc, hint)
        return None


@dataclass(frozen=True, slots=True)
class Wired:
    """A registry and the simulated tokens in it (named ``piv0``, ``usb0``, …)."""

    registry: SlotRegistry
    tokens: tuple[SimulatedToken, ...] = ()


def wire(
    transports: Iterable[str] = (),
    *,
    watchers: Sequence[Watcher] = (),
    simulate: Sequence[str] = (),
    options: TransportOptions | None = None,
    export_dir: Path | None = None,
    applets: Sequence[AppletOpener] = APPLETS,
    modules: Sequence[Mapping[str, Any]] = (),
    module_paths: Sequence[str] = (),
) -> Wired:
    """A registry with every applet, the named transports' watchers (a name given twice
    is watched once), ready-made ``watchers`` (tests, benchmarks), the vendor modules'
    watchers and simulated tokens.
    Demo certificates go to ``export_dir``, or ``export_dir/NAME`` when several tokens are
    simulated."""
    registry = SlotRegistry(list(applets))
    for name in dict.fromkeys(transports):
        watcher = make_watcher(name, options)
        if watcher is not None:
            registry.add_watcher(watcher)
    for watcher in watchers:
        registry.add_watcher(watcher)
    for watcher in module_watchers(modules, module_paths):
        registry.add_watcher(watcher)
    tokens: list[SimulatedToken] = []
    counts: dict[str, int] = {}
    for kind in simulate:
        factory = SIMULATORS.get(kind)
        if factory is None:
            raise ValueError(f"cannot simulate {kind!r} (known: {', '.join(SIMULATORS)})")
        index = counts.get(kind, 0)
        counts[kind] = index + 1
        name = f"{kind}{index}"
        where = export_dir / name if export_dir is not None and len(simulate) > 1 else export_dir
        watcher, token = factory(where, name, index)
        registry.add_watcher(watcher)
        tokens.append(token)
    return Wired(registry, tuple(tokens))


def build_registry(
    transports: Iterable[str] = (),
    *,
    watchers: Sequence[Watcher] = (),
    simulate: Sequence[str] = (),
    options: TransportOptions | None = None,
    export_dir: Path | None = None,
    applets: Sequence[AppletOpener] = APPLETS,
) -> SlotRegistry:
    """`wire` without the simulated-token handles (the test harness, the benchmarks)."""
    return wire(
        transports,
        watchers=watchers,
        simulate=simulate,
        options=options,
        export_dir=export_dir,
        applets=applets,
    ).registry
