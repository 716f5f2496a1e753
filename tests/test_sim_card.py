"""The virtual SIM (tokend.simulators.sim) at the APDU level: the UICC's T=0 rules and
ICCID, the legacy IsoApplet's file system, ACLs, PIN/PUK, lifecycle, keys, chaining and
persistence. OpenSC drives the same card in test_sim_opensc.py."""

from __future__ import annotations

import json
import os
import stat

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from tokend import pkcs15
from tokend.iso7816 import ApduChannel, CommandApdu, ResponseApdu, encode_tlv, find_tlv
from tokend.sim import codes as sc
from tokend.sim import commands as cmd
from tokend.simulators.sim import CURVES, DEFAULT_ATR, VirtualSim
from tokend.simulators.sim_demo import (
    DEMO_PIN,
    DEMO_PUK,
    ENCRYPTION_REF,
    RETIRED_REF,
    SIGNING_REF,
    Personaliser,
    provision_sim_demo,
)

PIN = b"123456"


def blk(pin: bytes) -> bytes:
    return bytes(sc.PIN_FORMAT.block(pin))


PUK = b"0123456789abcdef"


def raw(card: VirtualSim, hexapdu: str) -> str:
    return card.process(bytes.fromhex(hexapdu.replace(" ", ""))).hex().upper()


def channel(card: VirtualSim) -> ApduChannel:
    return ApduChannel(card.process, extended=False)


def send(card: VirtualSim, command: CommandApdu) -> ResponseApdu:
    return channel(card).send(command)


def ok(card: VirtualSim, command: CommandApdu) -> bytes:
    return send(card, command).check()


def personalised(**kwargs) -> VirtualSim:
    """A SIM with PUK + PIN set and the PKCS#15 skeleton, PIN verified."""
    card = VirtualSim(**kwargs)
    Personaliser(lambda c: ok(card, c)).create_pkcs15(PIN, PUK)
    return card


def test_atr_offers_t0_only() -> None:
    card = VirtualSim()
    atr = card.atr
    assert atr == DEFAULT_ATR
    t0 = atr[1]
    assert t0 & 0x80  # TD1 present
    td1_index = 2 + bin(t0 & 0x70).count("1")
    assert atr[td1_index] == 0x00  # T=0 and no further interface bytes (no T=1, no TCK)


def test_iccid_is_read_from_the_uicc_before_any_applet() -> None:
    card = VirtualSim(iccid="8949123456789012345")
    # SELECT EF ICCID: case 4 on T=0 → 61xx, then GET RESPONSE of exactly that length.
    assert raw(card, "00A4 0004 02 2FE2").startswith("61")
    length = int(raw(card, "00A4 0004 02 2FE2")[2:], 16)
    assert raw(card, f"00C00000{length + 1:02X}") == f"6C{length:02X}"
    assert raw(card, f"00C00000{length:02X}").endswith("9000")
    # READ BINARY with a too long Le: 6C0A, then the exact length.
    assert raw(card, "00B0000000") == "6C0A"
    data = card.process(bytes.fromhex("00B000000A"))
    assert data[-2:] == b"\x90\x00"
    assert sc.decode_iccid(data[:-2]) == "8949123456789012345"


def _luhn_valid(number: str) -> bool:
    digits = [int(d) for d in reversed(number)]
    total = sum(digits[0::2]) + sum(sum(divmod(2 * d, 10)) for d in digits[1::2])
    return total % 10 == 0


def test_random_iccids_carry_a_luhn_digit() -> None:
    for _ in range(20):
        iccid = VirtualSim().iccid
        assert len(iccid) == 19 and iccid.startswith("89") and _luhn_valid(iccid)
        assert sc.decode_iccid(sc.encode_iccid(iccid)) == iccid
    with pytest.raises(ValueError):
        sc.decode_iccid(bytes.fromhex("98A4FFFFFFFFFFFFFFFF"))  # A is not a digit


def test_foreign_aids_get_6a82_and_the_applet_answers_its_version() -> None:
    card = VirtualSim()
    for aid in ("A000000308000010000100", "A00000000101", "627601FF000000", "D27600012401"):
        assert raw(card, f"00A40400{len(aid) // 2:02X}{aid}") == "6A82"
    assert raw(card, "00A404000C" + sc.ISOAPPLET_AID.hex()) == "6103"
    assert raw(card, "00C0000003") == "0006069000"  # major 00 (OpenSC 0.23), minor 06
    # A foreign SELECT while the applet is selected keeps it selected.
    assert raw(card, "00A4040006A00000000101") == "6A82"
    assert raw(card, "00A40000023F00").startswith("61")


def test_lifecycle_puk_exactly_16_then_pin() -> None:
    card = VirtualSim()
    ok(card, cmd.select_aid())
    assert send(card, CommandApdu(0, 0x24, 0x01, 0x02, b"short")).sw == 0x6700
    ok(card, cmd.set_initial_puk(PUK))
    # No CHANGE in the 'old, new' form before a PIN exists.
    assert send(card, cmd.change_pin(blk(PIN), blk(PIN))).sw == 0x6985
    assert send(card, CommandApdu(0, 0x24, 0x01, 0x01, b"123")).sw == 0x6700
    ok(card, cmd.set_initial_pin(PIN))
    assert send(card, cmd.set_initial_puk(PUK)).sw == 0x6A86  # once operational: no more
    with pytest.raises(ValueError):
        cmd.set_initial_puk(b"1234567812345678X")


def test_pin_tries_block_and_puk_unblocks() -> None:
    card = personalised()
    ok(card, cmd.select_aid())
    assert send(card, cmd.verify(blk(b"9999"))).sw == 0x63C2
    assert send(card, cmd.verify(blk(b"9999"))).sw == 0x63C1
    assert send(card, cmd.verify(None)).sw == 0x63C1  # status only: tries left
    assert send(card, cmd.verify(blk(b"9999"))).sw == 0x63C0
    assert send(card, cmd.verify(blk(PIN))).sw == 0x63C0  # blocked: even the right PIN
    assert send(card, CommandApdu(0, 0x20, 0x00, 0x01, b"12")).sw == 0x6700
    assert send(card, cmd.unblock_pin(b"x" * 16, blk(b"4321"))).sw == 0x63C4
    ok(card, cmd.unblock_pin(PUK, blk(b"4321")))
    assert send(card, cmd.verify(blk(PIN))).sw == 0x63C2
    ok(card, cmd.verify(blk(b"4321")))
    assert send(card, cmd.verify(None)).sw == 0x9000
    ok(card, cmd.change_pin(blk(b"4321"), blk(b"24680")))
    assert send(card, cmd.change_pin(blk(b"4321"), blk(b"1111"))).sw == 0x63C2
    ok(card, cmd.verify(blk(b"24680")))


def test_select_forgets_the_pin_and_reset_drops_volatile_state() -> None:
    card = personalised()
    ok(card, cmd.select_aid())
    ok(card, cmd.verify(blk(PIN)))
    ok(card, cmd.mse_set(sc.SeTemplate.GENERATE, sc.Alg.GEN_RSA_2048, 0))
    ok(card, cmd.select_aid())  # another program re-selects the applet
    assert send(card, cmd.mse_set(sc.SeTemplate.GENERATE, sc.Alg.GEN_RSA_2048, 0)).sw == 0x6982
    ok(card, cmd.verify(blk(PIN)))
    card.reset()
    # After a reset the UICC has no applet selected: MSE is not even understood.
    assert send(card, cmd.mse_set(sc.SeTemplate.GENERATE, sc.Alg.GEN_RSA_2048, 0)).sw == 0x6D00
    ok(card, cmd.select_aid())
    assert send(card, cmd.verify(None)).sw == 0x63C3


def test_acls_protect_directory_files_but_not_odf() -> None:
    card = personalised()
    ok(card, cmd.select_aid())  # operational: files count as authenticated only after VERIFY
    aodf = pkcs15.PKCS15_DF + b"\x44\x01"
    odf = pkcs15.PKCS15_DF + b"\x50\x31"
    ok(card, cmd.select_path(aodf, fcp=False))
    assert send(card, cmd.update_binary(0, b"\x30\x00")[0]).sw == 0x6982
    assert send(card, cmd.read_binary(0, 16)).ok  # READ is always allowed
    ok(card, cmd.select_path(odf, fcp=False))
    ok(card, cmd.update_binary(0, pkcs15.build_odf([])[:0] + b"\xa8\x00")[0])  # no PIN needed
    ok(card, cmd.verify(blk(PIN)))
    ok(card, cmd.select_path(aodf, fcp=False))
    ok(card, cmd.update_binary(0, b"\x30\x00")[0])
    # A failed VERIFY drops the files' authentication again.
    assert send(card, cmd.verify(blk(b"0000"))).sw == 0x63C2
    assert send(card, cmd.update_binary(0, b"\x30\x00")[0]).sw == 0x6982


def test_file_system_rules() -> None:
    card = personalised()
    ok(card, cmd.select_aid())
    ok(card, cmd.verify(blk(PIN)))
    fcp = ok(card, cmd.select_path(pkcs15.PKCS15_DF + b"\x50\x32", fcp=True))
    assert fcp.startswith(b"\x6f") and cmd.fcp_size(fcp) is not None  # stored verbatim
    ok(card, cmd.select_path(pkcs15.PKCS15_DF, fcp=False))
    make = cmd.create_file(cmd.fcp(0x5031, fdb=sc.Fdb.TRANSPARENT_EF, size=8, acl=None))
    assert send(card, make).sw == 0x6A80  # FIDs are unique in the whole tree
    ok(card, cmd.create_file(cmd.fcp(0x1234, fdb=sc.Fdb.TRANSPARENT_EF, size=8, acl=None)))
    assert send(card, cmd.update_binary(4, b"12345")[0]).sw == 0x6B00  # past the end
    assert send(card, CommandApdu(0, 0xB0, 0, 8, le=1)).sw == 0x6B00
    ok(card, cmd.update_binary(0, b"abcdefgh")[0])
    assert raw(card, "00B0000400") == "6C04"  # T=0: wrong Le
    assert raw(card, "00B0000404") == b"efgh".hex().upper() + "9000"
    assert send(card, CommandApdu(0, 0xA4, 0x00, 0x01, b"\x12\x34")).sw == 0x6A86
    assert send(card, CommandApdu(0, 0xA4, 0x04, 0x00, b"\x01\x02\x03\x04\x05")).sw == 0x6A82
    assert send(card, cmd.delete_file(0x3F00)).sw == 0x6986
    ok(card, cmd.delete_file(0x1234))
    assert send(card, cmd.select_path(pkcs15.PKCS15_DF + b"\x12\x34", fcp=False)).sw == 0x6A82
    assert send(card, CommandApdu(0, 0xB2, 0, 0, le=0)).sw == 0x6D00  # no record commands
    assert send(card, CommandApdu(0x80, 0xCA, 0, 0, le=0)).sw == 0x6E00


def _rsa_public(card: VirtualSim, ref: int) -> rsa.RSAPublicKey:
    ok(card, cmd.mse_set(sc.SeTemplate.GENERATE, sc.Alg.GEN_RSA_2048, ref))
    n, e = cmd.parse_rsa_public(ok(card, cmd.generate_rsa()))
    return rsa.RSAPublicNumbers(e, n).public_key()


def test_generate_sign_and_decipher_with_chaining_and_61xx() -> None:
    card = personalised()
    ok(card, cmd.select_aid())
    ok(card, cmd.verify(blk(PIN)))
    # GENERATE: 256 bytes + 61 0E, then GET RESPONSE of exactly 0E (else 6C0E).
    ok(card, cmd.mse_set(sc.SeTemplate.GENERATE, sc.Alg.GEN_RSA_2048, 3))
    first = card.process(bytes.fromhex("0046420000"))
    assert len(first) == 258 and first[-2:] == b"\x61\x0e"
    assert raw(card, "00A40000023F00") == "6900"  # pending data: nothing else
    assert raw(card, "00C0000010") == "6C0E"
    rest = card.process(bytes.fromhex("00C000000E"))
    assert rest[-2:] == b"\x90\x00"
    n, e = cmd.parse_rsa_public(first[:-2] + rest[:-2])
    public = rsa.RSAPublicNumbers(e, n).public_key()

    ok(card, cmd.mse_set(sc.SeTemplate.SIGN, sc.Alg.RSA_PKCS1, 3))
    digest = hashes.Hash(hashes.SHA256())
    digest.update(b"mail")
    digest_info = bytes.fromhex("3031300d060960864801650304020105000420") + digest.finalize()
    signature = ok(card, cmd.pso_sign(digest_info))
    public.verify(signature, b"mail", padding.PKCS1v15(), hashes.SHA256())
    # Le under 256: 6C00 (the channel would re-send with Le 256; check the raw answer).
    short_le = CommandApdu(0, 0x2A, 0x9E, 0x9A, digest_info, le=128).encode()
    assert card.process(short_le) == b"\x6c\x00"

    ok(card, cmd.mse_set(sc.SeTemplate.DECIPHER, sc.Alg.RSA_PKCS1, 3))
    ciphertext = public.encrypt(b"content key 1234", padding.PKCS1v15())
    # 257 bytes: chained 255 + 2 by the channel (CLA 10 first), as OpenSC does.
    assert ok(card, cmd.pso_decipher(ciphertext)) == b"content key 1234"
    assert raw(card, "102A8086FF00" + ciphertext[:254].hex()) == "9000"
    assert raw(card, "00228086 02" + ciphertext[254:].hex()) == "6900"  # header changed
    # A block with signature padding (type 01) is not a PKCS #1 v1.5 encryption block.
    numbers = public.public_numbers()
    block = int.from_bytes(b"\x00\x01" + b"\xff" * 200 + b"\x00" + bytes(53), "big")
    wrong_type = pow(block, numbers.e, numbers.n).to_bytes(256, "big")
    assert send(card, cmd.pso_decipher(wrong_type)).sw == 0x6A80
    assert send(card, CommandApdu(0, 0x2A, 0x80, 0x86, b"\x01" + ciphertext)).sw == 0x6A80
    # Only PSO, GENERATE and PUT DATA may be chained; the key type must match the algorithm.
    assert raw(card, "10B0000010") == "6884"
    assert send(card, cmd.mse_set(sc.SeTemplate.SIGN, sc.Alg.ECDSA_SHA1, 3)).sw == 0x6A80
    assert send(card, cmd.mse_set(sc.SeTemplate.DECIPHER, sc.Alg.ECDSA_SHA1, 3)).sw == 0x6A81
    assert send(card, cmd.mse_set(sc.SeTemplate.SIGN, sc.Alg.RSA_PKCS1, 9)).sw == 0x6F00


def test_ec_generation_and_ecdsa_sha1() -> None:
    card = personalised()
    ok(card, cmd.select_aid())
    ok(card, cmd.verify(blk(PIN)))
    curve = CURVES[0]
    params = curve.params()
    body = b"".join(encode_tlv(t, params[t]) for t in (0x81, 0x82, 0x83, 0x84, 0x85, 0x87))
    ok(card, cmd.mse_set(sc.SeTemplate.GENERATE, sc.Alg.GEN_EC, 4))
    answer = ok(card, CommandApdu(0, 0x46, 0, 0, body, le=256))
    point = find_tlv(find_tlv(answer, 0x7F49) or b"", 0x86)
    public = ec.EllipticCurvePublicKey.from_encoded_point(ec.SECP256R1(), point or b"")
    ok(card, cmd.mse_set(sc.SeTemplate.SIGN, sc.Alg.ECDSA_SHA1, 4))
    signature = ok(card, cmd.pso_sign(b"the message itself"))
    public.verify(signature, b"the message itself", ec.ECDSA(hashes.SHA1()))
    with pytest.raises(InvalidSignature):
        public.verify(signature, b"another message", ec.ECDSA(hashes.SHA1()))


def test_import_is_a_build_option() -> None:
    key = rsa.generate_private_key(65537, 2048)
    n = key.private_numbers()
    refused = personalised(import_allowed=False)
    ok(refused, cmd.select_aid())
    ok(refused, cmd.verify(blk(PIN)))
    ok(refused, cmd.mse_set(sc.SeTemplate.GENERATE, sc.Alg.GEN_RSA_2048, 0))
    assert send(refused, cmd.put_rsa_key(n.p, n.q, n.iqmp, n.dmp1, n.dmq1)).sw == 0x6900

    card = personalised()
    ok(card, cmd.select_aid())
    ok(card, cmd.verify(blk(PIN)))
    ok(card, cmd.mse_set(sc.SeTemplate.GENERATE, sc.Alg.GEN_RSA_2048, 0))
    ok(card, cmd.put_rsa_key(n.p, n.q, n.iqmp, n.dmp1, n.dmq1))
    bad = cmd.put_rsa_key(n.p, n.q, n.iqmp, n.dmq1, n.dmp1)  # swapped CRT parts
    assert send(card, bad).sw == 0x6A80
    ok(card, cmd.mse_set(sc.SeTemplate.DECIPHER, sc.Alg.RSA_PKCS1, 0))
    blob = key.public_key().encrypt(b"imported", padding.PKCS1v15())
    assert ok(card, cmd.pso_decipher(blob)) == b"imported"


def test_state_file_keeps_keys_pins_and_files(tmp_path) -> None:
    path = tmp_path / "sim.json"
    card = VirtualSim(state_file=path, iccid="8949000000000000001")
    material = provision_sim_demo(card)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600  # private keys inside
    ok(card, cmd.select_aid())
    assert send(card, cmd.verify(blk(b"0000"))).sw == 0x63C2  # counted and saved

    again = VirtualSim(state_file=path)
    assert again.iccid == "8949000000000000001"
    ok(again, cmd.select_aid())
    assert send(again, cmd.verify(None)).sw == 0x63C2
    ok(again, cmd.verify(blk(DEMO_PIN)))
    ok(again, cmd.mse_set(sc.SeTemplate.DECIPHER, sc.Alg.RSA_PKCS1, ENCRYPTION_REF))
    blob = material.encryption_public_key.encrypt(b"session key", padding.PKCS1v15())
    assert ok(again, cmd.pso_decipher(blob)) == b"session key"
    assert json.loads(path.read_text())["format"] == "tokend-virtual-sim"


def test_demo_provisioning_layout() -> None:
    card = VirtualSim()
    material = provision_sim_demo(card)
    assert (material.pin, material.puk) == (b"1234", b"1234567812345678")
    ch = channel(card)

    def read(path: bytes) -> bytes:
        fcp = ch.send(cmd.select_path(path, fcp=True)).check()
        size = cmd.fcp_size(fcp) or 0
        out = b""
        while len(out) < size:
            out += ch.send(cmd.read_binary(len(out), min(256, size - len(out)))).check()
        return out

    ch.send(cmd.select_aid()).check()
    df = pkcs15.PKCS15_DF
    odf = {e.kind: e.path for e in pkcs15.parse_odf(read(df + b"\x50\x31"))}
    keys = pkcs15.parse_prkdf(read(odf[pkcs15.OdfKind.PRIVATE_KEYS]))
    assert [k.key_reference for k in keys] == [ENCRYPTION_REF, SIGNING_REF, RETIRED_REF]
    certs = pkcs15.parse_cdf(read(odf[pkcs15.OdfKind.CERTIFICATES]))
    der = read(certs[SIGNING_REF].path or b"")
    assert der == material.signing_cert.public_bytes(serialization.Encoding.DER)
    # The signing key was generated on the card: its public key is only in the certificate.
    ch.send(cmd.verify(blk(DEMO_PIN))).check()
    ch.send(cmd.mse_set(sc.SeTemplate.SIGN, sc.Alg.RSA_PKCS1, SIGNING_REF)).check()
    digest_info = bytes.fromhex("3021300906052b0e03021a05000414") + bytes(20)
    signature = ch.send(cmd.pso_sign(digest_info)).check()
    material.signing_public_key.recover_data_from_signature(signature, padding.PKCS1v15(), None)
    assert DEMO_PUK == b"1234567812345678"


def test_internal_errors_answer_6f00_and_logical_channels_6881() -> None:
    card = VirtualSim()
    assert raw(card, "01A4040005A000000001") == "6881"
    assert raw(card, "00A4") == "6700"
    assert raw(card, "0CA40000023F00") in ("6882", "6881")
