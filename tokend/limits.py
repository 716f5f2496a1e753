"""The daemon's resource limits, in one place (docs/protocol.md §1.1 lists them with the
errors a client gets). Every client is the user's own program, but any of them may be
buggy or hostile: no single connection may grow the daemon without bound or starve the
others. Pure values, no I/O."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Limits:
    #: Open connections in total / from one uid; more are answered with one -32000
    #: error line and closed.
    max_connections: int = 512
    max_connections_per_uid: int = 256
    #: PKCS#11 sessions one connection (application) may hold: CKR_SESSION_COUNT beyond.
    #: Also reported as the token's max_session_count / max_rw_session_count.
    max_sessions_per_application: int = 64
    #: C_WaitForSlotEvent calls blocked at once on one connection: CKR_FUNCTION_FAILED
    #: beyond (PKCS#11 expects one waiting thread; a few are allowed).
    max_pending_waits: int = 8
    #: Bytes of multi-part input (C_SignUpdate) one connection may have buffered across
    #: its sessions: CKR_DATA_LEN_RANGE beyond, and that operation ends.
    max_multipart_bytes: int = 1 << 20
    #: Session objects (derived ECDH secrets) one connection may hold: CKR_HOST_MEMORY.
    max_session_objects: int = 64
    #: Pipelined requests answered per write; the daemon reads no further from a
    #: connection until these answers are written (and the client reads them).
    max_batch: int = 128
    #: Wrong-PIN back-off per token: after a wrong PIN, C_Login on that token is refused
    #: (CKR_FUNCTION_FAILED, data.retry_after) for this long, doubling per consecutive
    #: wrong PIN up to the maximum; a correct PIN ends it.
    wrong_pin_backoff: float = 1.0
    wrong_pin_backoff_max: float = 30.0


DEFAULT_LIMITS = Limits()
