"""Acceptance over processes, as a user runs it: `tokend simulate ble` (virtual key + fake
BlueZ + private dbus-daemon), `tokend serve --transport ble` with the printed bus address,
`tokenctl ble pair`, then mail encrypted with `openssl cms` decrypts through the daemon and a
signature verifies; the simulator's stdin controls range and BlueZ."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.ble_fixtures import ble_unavailable_reason

ADDRESS = "C0:FF:EE:00:00:01"
PIN = "123456"

pytestmark = pytest.mark.skipif(ble_unavailable_reason() is not None, reason="no BLE tier")


class Sim:
    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc

    def command(self, line: str) -> str:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return self.proc.stdout.readline().strip()


@pytest.fixture
def world(tmp_path: Path, bluetoothctl_shim: Path) -> Iterator[dict]:  # type: ignore[type-arg]
    demo = tmp_path / "demo"
    sim = subprocess.Popen(
        [sys.executable, "-m", "tokend.cli.tokend_main", "simulate", "ble",
         "--provision", "demo", "--export-dir", str(demo)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
    )  # fmt: skip
    serve = None
    try:
        assert sim.stdout is not None
        line = sim.stdout.readline().strip()
        assert line.startswith("DBUS_SYSTEM_BUS_ADDRESS="), line
        env = dict(os.environ)
        env["DBUS_SYSTEM_BUS_ADDRESS"] = line.split("=", 1)[1]
        env["TOKEND_STATE_DIR"] = str(tmp_path / "state")
        sock = tmp_path / "tokend.sock"
        log = (tmp_path / "serve.log").open("w")
        serve = subprocess.Popen(
            [sys.executable, "-m", "tokend.cli.tokend_main", "serve", "--transport", "ble",
             "--socket", str(sock)],
            env=env, stdout=log, stderr=subprocess.STDOUT, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 20
        while not sock.exists():
            assert serve.poll() is None, (tmp_path / "serve.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        yield {"sim": Sim(sim), "env": env, "sock": sock, "demo": demo, "tmp": tmp_path}
    finally:
        if serve is not None:
            serve.terminate()
            serve.wait(10)
        if sim.poll() is None:
            sim.stdin.close()  # type: ignore[union-attr]  # EOF = quit
            sim.wait(10)


def tokenctl(
    world: dict, *args: str, stdin: str = "", pins: str = ""
) -> subprocess.CompletedProcess:  # type: ignore[type-arg]
    r, w = os.pipe()
    os.write(w, pins.encode())
    os.close(w)
    try:
        return subprocess.run(
            [sys.executable, "-m", "tokend.cli.tokenctl", "--socket", str(world["sock"]),
             *(a.replace("{fd}", str(r)) for a in args)],
            env=world["env"], input=stdin, capture_output=True, text=True, timeout=60,
            pass_fds=(r,),
        )  # fmt: skip
    finally:
        os.close(r)


def listed(world: dict) -> str:  # type: ignore[type-arg]
    done = tokenctl(world, "list")
    assert done.returncode == 0, done.stderr
    return done.stdout


def wait_listed(world: dict, present: bool, timeout: float = 10) -> str:  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout
    while True:
        out = listed(world)
        if ("serial" in out) == present:
            return out
        assert time.monotonic() < deadline, out
        time.sleep(0.1)


def openssl(*args: str | Path, stdin: bytes | None = None) -> bytes:
    done = subprocess.run(["openssl", *map(str, args)], input=stdin, capture_output=True)
    assert done.returncode == 0, done.stderr.decode()
    return done.stdout


def test_pair_decrypt_sign_and_link_loss(world) -> None:  # type: ignore[no-untyped-def]
    sim, demo, tmp = world["sim"], world["demo"], world["tmp"]
    # Before pairing: in range, not paired, not trusted; the daemon does not use it.
    done = tokenctl(world, "ble", "list", "--scan", "0.5")
    assert done.returncode == 0, done.stderr
    assert ADDRESS in done.stdout and "not paired" in done.stdout and "not trusted" in done.stdout
    assert "serial" not in listed(world)

    refused = tokenctl(world, "ble", "pair", ADDRESS, stdin="n\n")
    assert refused.returncode == 1 and "pairing with" in refused.stderr
    assert "passkey" in refused.stderr  # the agent asked
    paired = tokenctl(world, "ble", "pair", ADDRESS, stdin="y\n")
    assert paired.returncode == 0, paired.stderr
    assert "trusted" in paired.stdout

    out = wait_listed(world, present=True)
    assert f"BLE {ADDRESS}" in out

    message = b"Content-Type: text/plain\r\n\r\nmail for the BLE key\r\n"
    mail = tmp / "mail.p7m"
    openssl("cms", "-encrypt", "-aes256", "-recip", demo / "encryption.pem",
            "-out", mail, stdin=message)  # fmt: skip
    done = tokenctl(world, "smime", "decrypt", str(mail), "--pin-fd", "{fd}", pins=f"{PIN}\n")
    assert done.returncode == 0, done.stderr
    assert "mail for the BLE key" in done.stdout

    data = tmp / "data.txt"
    data.write_bytes(b"signed over BLE")
    sig = tmp / "sig.der"
    done = tokenctl(world, "sign", "--key", "9c", "--mechanism", "ecdsa-sha256", "--der",
                    "--in", str(data), "--out", str(sig), "--pin-fd", "{fd}",
                    pins=f"{PIN}\n{PIN}\n")  # fmt: skip
    assert done.returncode == 0, done.stderr
    pub = tmp / "signing.pub"
    openssl("x509", "-in", demo / "signing.pem", "-pubkey", "-noout", "-out", pub)
    assert b"Verified OK" in openssl("dgst", "-sha256", "-verify", pub, "-signature", sig, data)

    # And as a mail client signs: S/MIME through the daemon, verified by openssl.
    signed = tmp / "signed.eml"
    done = tokenctl(world, "smime", "sign", str(data), "--out", str(signed),
                    "--pin-fd", "{fd}", pins=f"{PIN}\n{PIN}\n")  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert b"signed over BLE" in openssl(
        "cms", "-verify", "-CAfile", demo / "ca.pem", "-in", signed
    )

    assert sim.command("out-of-range") == "ok out-of-range"
    wait_listed(world, present=False, timeout=2)
    done = tokenctl(world, "smime", "decrypt", str(mail), "--pin-fd", "{fd}", pins=f"{PIN}\n")
    assert done.returncode != 0
    assert sim.command("in-range") == "ok in-range"
    wait_listed(world, present=True)
    assert sim.command("kill-bluez") == "ok kill-bluez"
    wait_listed(world, present=False, timeout=2)
    assert sim.command("start-bluez") == "ok start-bluez"
    wait_listed(world, present=True)
    done = tokenctl(world, "smime", "decrypt", str(mail), "--pin-fd", "{fd}", pins=f"{PIN}\n")
    assert done.returncode == 0 and "mail for the BLE key" in done.stdout, done.stderr
    assert sim.command("status").startswith("ok in-range connected bonded")
    assert sim.command("bogus").startswith("error unknown command")

    forgot = tokenctl(world, "ble", "forget", ADDRESS)
    assert forgot.returncode == 0, forgot.stderr
    wait_listed(world, present=False, timeout=2)
    assert sim.command("quit") == "ok quit"
