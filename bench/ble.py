"""BLE row: RSA-2048 decrypt through the daemon over the BLE transport (real bleak, a private
dbus-daemon, the fake BlueZ, the virtual BLE key with the demo PIV card) against the same
card in the in-process reader, interleaved in one run; plus the framing's own cost (cut and
reassemble, no I/O) per APDU size. The BLE figure is D-Bus and Python cost only: a radio
adds at least one connection interval per write (docs/ble.md)."""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench.common import SectionResult, Summary, interleave
from bench.ops import PIN, rsa_blob


def framing_cost(size: int, fragment: int, n: int) -> float:
    """Seconds per APDU to fragment and reassemble ``size`` bytes (median of ``n``)."""
    from tokend import ble_framing as bf

    data = bytes(size)
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        r = bf.Reassembler()
        for frag in bf.fragments(bf.Cmd.MSG, data, fragment):
            r.feed(frag)
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def _session(sock: Path, demo):  # type: ignore[no-untyped-def]
    from tokend.client import Client
    from tokend.pkcs11 import CKA

    client = Client(sock)
    slot = None
    deadline = time.monotonic() + 15
    while not slot:
        slot = client.slot_list(token_present=True)
        if time.monotonic() > deadline:
            raise TimeoutError("the BLE key did not arrive")
        time.sleep(0.05)
    session = client.open_session(slot[0])
    client.login(session, PIN)
    (key,) = client.find_objects(session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_ID: b"\x03"})
    blob = rsa_blob(demo.encryption_public_key)

    def decrypt() -> None:
        assert client.decrypt(session, key, "CKM_RSA_PKCS", blob.ciphertext) == blob.secret

    return client, decrypt


def run(quick: bool = False) -> SectionResult:
    res = SectionResult("ble")
    rounds, per_round = (3, 5) if quick else (20, 10)
    for size in (5, 261, 2048, 4096):
        cost = framing_cost(size, 244, 50 if quick else 500)
        res.row(f"framing: {size} B APDU, 244 B fragments", f"{cost * 1e6:.1f} µs", note="cut+join")
        res.data[f"framing_us_{size}"] = round(cost * 1e6, 2)
    if shutil.which("dbus-daemon") is None:
        res.row("decrypt over BLE", "dbus-daemon missing", verdict="skipped")
        return res

    from tokend.drivers.ble import BleWatcher, TrustStore
    from tokend.simulators.ble import FakeBlueZThread, PrivateBus, VirtualBleKey
    from tokend.simulators.demo import provision_demo
    from tokend.simulators.memory import MemoryReader, MemoryWatcher
    from tokend.simulators.piv import VirtualPivCard
    from tokend.testing import start_thread_daemon

    tmp = Path(tempfile.mkdtemp(prefix="tokend-bench-ble-"))
    saved = {k: os.environ.get(k) for k in ("DBUS_SYSTEM_BUS_ADDRESS", "TOKEND_STATE_DIR")}
    bus = PrivateBus()
    fake = None
    daemons = []
    clients = []
    try:
        address = bus.start()
        os.environ["DBUS_SYSTEM_BUS_ADDRESS"] = address
        os.environ["TOKEND_STATE_DIR"] = str(tmp / "state")
        fake = FakeBlueZThread(address).start()
        ble_card, mem_card = VirtualPivCard(), VirtualPivCard()
        ble_demo, mem_demo = provision_demo(ble_card), provision_demo(mem_card)
        key = VirtualBleKey(ble_card)
        fake.add_key(key, paired=True)
        TrustStore().add(key.address, key.name)
        reader = MemoryReader("Bench Reader")
        reader.insert(mem_card)
        daemons.append(start_thread_daemon(tmp / "ble.sock", [BleWatcher()]))
        daemons.append(start_thread_daemon(tmp / "mem.sock", [MemoryWatcher(reader)]))
        ble_client, ble_decrypt = _session(tmp / "ble.sock", ble_demo)
        mem_client, mem_decrypt = _session(tmp / "mem.sock", mem_demo)
        clients += [ble_client, mem_client]
        for _ in range(per_round):
            ble_decrypt(), mem_decrypt()
        over_ble, in_memory = interleave(rounds, per_round, [ble_decrypt, mem_decrypt])
        b, m = Summary.of(over_ble), Summary.of(in_memory)
        added = b.median_ms - m.median_ms
        res.row(
            "RSA-2048 decrypt over BLE (fake BlueZ)",
            f"{b.median_ms:.2f} ms median, p99 {b.p99_ms:.2f}",
            note=f"n={b.n}",
        )
        res.row(
            "  BLE link's added cost vs in-process reader",
            f"{added:+.2f} ms",
            note=f"in-process reader {m.median_ms:.2f} ms",
        )
        res.data["decrypt_ble"] = b.as_dict()
        res.data["decrypt_memory"] = m.as_dict()
        res.data["ble_added_ms_median"] = round(added, 3)
    finally:
        for client in clients:
            client.close()
        for daemon in daemons:
            daemon.stop()
        if fake is not None:
            fake.stop()
        bus.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)
    return res
