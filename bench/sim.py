"""The SIM row: RSA-2048 decrypt (CKM_RSA_PKCS, the card strips the padding) and RSA-2048
sign (CKM_SHA256_RSA_PKCS, the card pads the DigestInfo) on the demo virtual SIM, (a)
in-process through the SIM driver and (b) through tokend's native socket (``tokend serve
--no-pcsc --simulate sim`` in its own process, in-process reader). Alternating rounds, as
in the overhead section. The virtual SIM's own work (T=0 paging, chaining, the applet's
RSA) is in both; (b) - (a) is tokend's cost."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

from bench.common import SectionResult, Summary, interleave, tokend_daemon
from bench.ops import check_decrypt, rsa_blob

SIM_PIN = "1234"
MESSAGE = b"tokend bench message"
LABELS = {"decrypt": "SIM RSA-2048 decrypt", "sign": "SIM RSA-2048 sign (SHA-256)"}


def _check_sign(signature: bytes, public_key: rsa.RSAPublicKey) -> None:
    public_key.verify(signature, MESSAGE, padding.PKCS1v15(), hashes.SHA256())


def in_process() -> tuple[Callable[[], bytes], Callable[[], bytes], Callable[[], None]]:
    from tokend.drivers.sim import SimToken
    from tokend.model import Mechanism, ObjectKey, ObjectKind
    from tokend.pkcs11 import CKM
    from tokend.simulators.memory import MemoryReader
    from tokend.simulators.sim import VirtualSim
    from tokend.simulators.sim_demo import ENCRYPTION_REF, SIGNING_REF, provision_sim_demo

    card = VirtualSim()
    demo = provision_sim_demo(card)
    reader = MemoryReader("Bench SIM Reader")
    reader.insert(card)
    token = SimToken.open(reader.connect())
    assert token is not None
    token.login(bytearray(SIM_PIN.encode()))
    blob = rsa_blob(demo.encryption_public_key)
    pkcs1, sha256 = Mechanism(CKM.CKM_RSA_PKCS), Mechanism(CKM.CKM_SHA256_RSA_PKCS)
    enc, sig = (
        ObjectKey(ObjectKind.PRIVATE_KEY, ENCRYPTION_REF),
        ObjectKey(ObjectKind.PRIVATE_KEY, SIGNING_REF),
    )

    def decrypt() -> bytes:
        return token.decrypt(enc, pkcs1, blob.ciphertext)

    def sign() -> bytes:
        return token.sign(sig, sha256, MESSAGE)

    check_decrypt(decrypt(), blob)
    _check_sign(sign(), demo.signing_public_key)
    return decrypt, sign, token.close


def through_socket(sock: Path, cert_dir: Path):  # type: ignore[no-untyped-def]
    from tokend.client import Client
    from tokend.pkcs11 import CKA

    client = Client(sock)
    session = client.open_session(0)
    client.login(session, SIM_PIN)

    def key(label: str) -> int:
        (handle,) = client.find_objects(
            session, {CKA.CKA_CLASS: "CKO_PRIVATE_KEY", CKA.CKA_LABEL: label}
        )
        return handle

    enc, sig = key("Encryption key"), key("Signing key")
    enc_public = x509.load_pem_x509_certificate((cert_dir / "encryption.pem").read_bytes())
    sig_public = x509.load_pem_x509_certificate((cert_dir / "signing.pem").read_bytes())
    enc_key, sig_key = enc_public.public_key(), sig_public.public_key()
    assert isinstance(enc_key, rsa.RSAPublicKey) and isinstance(sig_key, rsa.RSAPublicKey)
    blob = rsa_blob(enc_key)

    def decrypt() -> bytes:
        return client.decrypt(session, enc, "CKM_RSA_PKCS", blob.ciphertext)

    def sign() -> bytes:
        return client.sign(session, sig, "CKM_SHA256_RSA_PKCS", MESSAGE)

    check_decrypt(decrypt(), blob)
    _check_sign(sign(), sig_key)
    return decrypt, sign, client.close


def run(quick: bool = False) -> SectionResult:
    res = SectionResult("9 SIM")
    rounds, per_round = (3, 3) if quick else (20, 10)
    local_decrypt, local_sign, local_close = in_process()
    with tokend_daemon(simulate="sim") as daemon:
        remote_decrypt, remote_sign, remote_close = through_socket(
            daemon.socket, daemon.workdir / "card0"
        )
        try:
            for _ in range(per_round):  # warm both paths
                local_decrypt(), remote_decrypt(), local_sign(), remote_sign()
            series = {
                "decrypt": interleave(rounds, per_round, [local_decrypt, remote_decrypt]),
                "sign": interleave(rounds, per_round, [local_sign, remote_sign]),
            }
        finally:
            remote_close()
            local_close()
    for op, runs in series.items():
        sa, sb = Summary.of(runs[0]), Summary.of(runs[1])
        overhead = round(sb.median_ms - sa.median_ms, 4)
        res.data[op] = {
            "a_in_process": sa.as_dict(),
            "b_native_socket": sb.as_dict(),
            "overhead_ms_median": overhead,
        }
        res.row(
            f"{LABELS[op]} (b) through the daemon",
            f"median {sb.median_ms:.2f} ms, p99 {sb.p99_ms:.2f} ms",
            "",
            "info",
        )
        res.row(
            f"{LABELS[op]} (a) in-process; tokend's share",
            f"median {sa.median_ms:.2f} ms; (b)-(a) {overhead:.3f} ms",
            "",
            "info",
        )
    res.data["rounds"], res.data["per_round"] = rounds, per_round
    return res
