"""udev/69-tokend.rules: lint it with Debian 12's udev (252: no `udevadm verify`, and
`udevadm test` exits 0 on bad rules, so its output is read), and check with umockdev
sample devices that each rule matches a CCID token and none matches a keyboard."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RULES = ROOT / "udev" / "69-tokend.rules"
DEVPATH = "/devices/pci0000:00/0000:00:14.0/usb1/1-1"

needs = [tool for tool in ("udevadm", "umockdev-run", "unshare") if shutil.which(tool) is None]
if needs and os.environ.get("CI"):
    raise RuntimeError(f"the udev lint test must run in CI: install {needs} (debian-packages.txt)")
pytestmark = pytest.mark.skipif(bool(needs), reason=f"needs {needs} (Debian: udev, umockdev)")


# -- sample devices, described by their USB descriptors as the kernel exposes them -----------


def _device(vid: int, pid: int) -> bytes:
    return struct.pack("<BBHBBBBHHHBBBB", 18, 1, 0x200, 0, 0, 0, 64, vid, pid, 0x100, 1, 2, 3, 1)


def _interface(number: int, klass: int, sub: int, proto: int, endpoints: int) -> bytes:
    return struct.pack("<BBBBBBBBB", 9, 4, number, 0, endpoints, klass, sub, proto, 0)


def _endpoint(address: int, attributes: int, size: int, interval: int) -> bytes:
    return struct.pack("<BBBBHB", 7, 5, address, attributes, size, interval)


_HID = bytes([9, 0x21, 0x11, 0x01, 0, 1, 0x22, 0x20, 0])
_CCID = bytes([54, 0x21]) + bytes(52)


def _ccid_interface(number: int) -> bytes:
    return (
        _interface(number, 0x0B, 0, 0, 3)
        + _CCID
        + _endpoint(0x02, 2, 64, 0)
        + _endpoint(0x83, 2, 64, 0)
        + _endpoint(0x84, 3, 8, 32)
    )


def _config(interfaces: int, body: bytes) -> bytes:
    return struct.pack("<BBHBBBBB", 9, 2, 9 + len(body), interfaces, 1, 0, 0x80, 50) + body


SAMPLES = {
    # YubiKey 5 shape: OTP keyboard (03/01/01), FIDO HID (03/00/00), CCID (0B/00/00).
    "yubikey": (
        0x1050,
        0x0407,
        "YubiKey OTP+FIDO+CCID",
        _config(
            3,
            _interface(0, 3, 1, 1, 1)
            + _HID
            + _endpoint(0x81, 3, 8, 10)
            + _interface(1, 3, 0, 0, 1)
            + _HID
            + _endpoint(0x82, 3, 64, 2)
            + _ccid_interface(2),
        ),
    ),
    # A CCID token tokend's list does not name (pid.codes test id).
    "ccid-token": (0x1209, 0x0001, "Virtual CCID token", _config(1, _ccid_interface(0))),
    # A plain USB keyboard: HID boot keyboard only.
    "keyboard": (
        0x046D,
        0xC31C,
        "USB Keyboard",
        _config(1, _interface(0, 3, 1, 1, 1) + _HID + _endpoint(0x81, 3, 8, 10)),
    ),
}


def umockdev_file(tmp: Path, name: str) -> Path:
    vid, pid, product, config = SAMPLES[name]
    descriptors = _device(vid, pid) + config
    path = tmp / f"{name}.umockdev"
    path.write_text(
        f"P: {DEVPATH}\nN: bus/usb/001/005\nE: DEVNAME=/dev/bus/usb/001/005\n"
        "E: DEVTYPE=usb_device\nE: DRIVER=usb\nE: BUSNUM=001\nE: DEVNUM=005\n"
        f"E: MAJOR=189\nE: MINOR=4\nE: SUBSYSTEM=usb\nE: PRODUCT={vid:x}/{pid:x}/100\n"
        f"A: idVendor={vid:04x}\nA: idProduct={pid:04x}\nA: bcdDevice=0100\n"
        f"A: bDeviceClass=00\nA: busnum=1\nA: devnum=5\nA: product={product}\n"
        f"H: descriptors={descriptors.hex()}\n"
    )
    return path


def udevadm_test(tmp: Path, rules: Path, sample: str, *, system_rules: bool) -> list[str]:
    """`udevadm test --action=add` on a sample device, in a private mount namespace: /run
    is a tmpfs (udevadm writes its database there) holding our rules; without
    ``system_rules`` the system's rules are hidden except 50-udev-default (usb_id)."""
    device = umockdev_file(tmp, sample)
    isolate = ""
    if not system_rules:
        isolate = (
            'cp /usr/lib/udev/rules.d/50-udev-default.rules "$T"/ && '
            "mount -t tmpfs tmpfs /usr/lib/udev/rules.d && "
            'cp "$T"/50-udev-default.rules /usr/lib/udev/rules.d/ && '
            "mount -t tmpfs tmpfs /etc/udev/rules.d && "
        )
    script = (
        f"set -e; T=$(mktemp -d); {isolate}"
        "mount -t tmpfs tmpfs /run && mkdir -p /run/udev/rules.d && "
        f"cp {rules} /run/udev/rules.d/69-tokend.rules && "
        f"exec umockdev-run --device {device} -- udevadm test --action=add /sys{DEVPATH}"
    )
    unshare = ["unshare", "--mount", "--propagation", "private"]
    if os.getuid() != 0:
        unshare.append("--map-root-user")
    done = subprocess.run(
        [*unshare, "sh", "-c", script], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    return (done.stdout + done.stderr).splitlines()


def lint_errors(lines: list[str]) -> list[str]:
    """What udev said about our file while parsing it (device processing lines start with
    the device's name, "1-1: …")."""
    return [
        line
        for line in lines
        if "69-tokend.rules" in line
        and not line.startswith("Reading rules file")
        and not line.startswith("1-1:")
    ]


def properties(lines: list[str]) -> dict[str, str]:
    return dict(line.split("=", 1) for line in lines if "=" in line and line[:1].isupper())


def test_rules_lint_clean(tmp_path: Path) -> None:
    lines = udevadm_test(tmp_path, RULES, "yubikey", system_rules=True)
    assert any("Reading rules file: /run/udev/rules.d/69-tokend.rules" in x for x in lines)
    assert lint_errors(lines) == []
    rules = [x for x in RULES.read_text().splitlines() if x.strip() and not x.startswith("#")]
    assert not any("MODE=" in x or "GROUP=" in x for x in rules)  # the seat ACL only
    assert rules[0] == 'ACTION=="remove", GOTO="tokend_end"'


def test_the_lint_catches_a_broken_rule(tmp_path: Path) -> None:
    broken = tmp_path / "69-tokend.rules"
    broken.write_text(
        RULES.read_text().replace('ATTR{idVendor}=="096e"', 'ATTRIBUTE{idVendor}=="096e"')
    )
    errors = lint_errors(udevadm_test(tmp_path, broken, "yubikey", system_rules=True))
    assert errors and "Invalid key" in errors[0]


def test_each_rule_matches_its_token_and_grants_uaccess(tmp_path: Path) -> None:
    # Only our rules tag anything here: every "uaccess" below is ours.
    yubikey = properties(udevadm_test(tmp_path, RULES, "yubikey", system_rules=False))
    assert yubikey["ID_USB_INTERFACES"] == ":030101:030000:0b0000:"
    assert yubikey["TOKEND_CCID"] == "1"  # rule 1: a CCID interface on the bulk protocol
    assert yubikey["ID_SECURITY_TOKEN"] == "1"  # rule 2: a token tokend names by USB id
    assert "uaccess" in yubikey["TAGS"].split(":")

    other = properties(udevadm_test(tmp_path, RULES, "ccid-token", system_rules=False))
    assert other["TOKEND_CCID"] == "1" and "ID_SECURITY_TOKEN" not in other
    assert "uaccess" in other["TAGS"].split(":")


def test_no_rule_matches_a_keyboard(tmp_path: Path) -> None:
    for system_rules in (False, True):
        keyboard = properties(udevadm_test(tmp_path, RULES, "keyboard", system_rules=system_rules))
        assert keyboard["ID_USB_INTERFACES"] == ":030101:"
        assert "TOKEND_CCID" not in keyboard and "ID_SECURITY_TOKEN" not in keyboard
        assert "uaccess" not in keyboard.get("TAGS", "").split(":")


def test_with_the_system_rules_the_token_gets_the_seat_acl(tmp_path: Path) -> None:
    lines = udevadm_test(tmp_path, RULES, "yubikey", system_rules=True)
    props = properties(lines)
    assert "uaccess" in props["TAGS"].split(":") and props["TOKEND_CCID"] == "1"
    assert any("RUN 'uaccess'" in line for line in lines)  # 73-seat-late applies the ACL
