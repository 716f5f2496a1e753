"""Bounded fuzzing of the JSON-RPC front door: random and mutated requests always get an
error object (never a crash or a hang), and the daemon keeps serving everyone."""

from __future__ import annotations

import json
import random
import socket

from tokend.client import Client

VALID = [
    {"jsonrpc": "2.0", "id": 1, "method": "C_GetSlotList", "params": {"token_present": True}},
    {"jsonrpc": "2.0", "id": 2, "method": "C_OpenSession", "params": {"slot_id": 0}},
    {
        "jsonrpc": "2.0",
        "id": 3,
        "method": "C_FindObjectsInit",
        "params": {"h_session": 1, "p_template": {"CKA_CLASS": "CKO_CERTIFICATE"}},
    },
    {
        "jsonrpc": "2.0",
        "id": 4,
        "method": "C_DecryptInit",
        "params": {
            "h_session": 1,
            "h_key": 5,
            "p_mechanism": {
                "mechanism": "CKM_RSA_PKCS_OAEP",
                "parameter": {"hash_alg": "CKM_SHA256", "mgf": "CKG_MGF1_SHA256"},
            },
        },
    },
    {
        "jsonrpc": "2.0",
        "id": 5,
        "method": "C_Login",
        "params": {"h_session": 1, "user_type": "CKU_USER", "p_pin": "000000"},
    },
]
ODD_VALUES = [None, True, -1, 2**70, 1.5, "", "A" * 300, [], {}, [1, "x"], {"a": None}, "Zm9v"]


def _mutate(rng: random.Random, obj: object) -> object:
    if isinstance(obj, dict):
        out = dict(obj)
        if out and rng.random() < 0.7:
            key = rng.choice(list(out))
            out[key] = _mutate(rng, out[key]) if rng.random() < 0.5 else rng.choice(ODD_VALUES)
        if rng.random() < 0.2:
            out[rng.choice(["x", "id", "params", "CKA_NOPE"])] = rng.choice(ODD_VALUES)
        return out
    return rng.choice(ODD_VALUES) if rng.random() < 0.5 else obj


def test_mutated_and_random_requests_get_errors_and_service_continues(memory_piv) -> None:
    rng = random.Random(20261126)
    with Client(memory_piv.socket) as bystander:
        for round_no in range(300):
            if round_no % 3 == 0:
                line = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
                line = line.replace(b"\n", b" ") + b"\n"
            else:
                line = json.dumps(_mutate(rng, rng.choice(VALID))).encode() + b"\n"
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                s.settimeout(5)
                s.connect(str(memory_piv.socket))
                s.sendall(line)
                s.shutdown(socket.SHUT_WR)
                data = b""
                while chunk := s.recv(65536):
                    data += chunk
            answers = data.splitlines()
            # Every request line is a request (an "id" is always there, or the line is not
            # JSON at all): exactly one answer each, never silence.
            assert len(answers) == 1, (line[:80], answers)
            msg = json.loads(answers[0])  # always valid JSON back
            assert "result" in msg or isinstance(msg["error"]["code"], int)
            assert "error" not in msg or msg["error"]["code"] != -32603, (line, msg)
            assert bystander.slot_list() == [0], f"daemon hurt by {line[:80]!r}"
