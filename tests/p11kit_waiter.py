"""C_WaitForSlotEvent through Debian's p11-kit-client.so, called the way NSS does: one
thread blocks in the wait, another finalizes the module (SECMOD_CancelWait). Run as its own
process: the client aborts the process when it gets this wrong.

    python -m tests.p11kit_waiter finalize   # wait, then C_Finalize from the main thread
    python -m tests.p11kit_waiter event      # wait until the test plugs or unplugs
"""

from __future__ import annotations

import ctypes
import sys
import threading
import time

CLIENT = "/usr/lib/x86_64-linux-gnu/pkcs11/p11-kit-client.so"
CKF_OS_LOCKING_OK = 0x2
#: Position of each function in CK_FUNCTION_LIST (PKCS#11 2.40), after the CK_VERSION.
C_INITIALIZE, C_FINALIZE, C_WAIT_FOR_SLOT_EVENT = 0, 1, 67

CK_RV = ctypes.c_ulong


class InitArgs(ctypes.Structure):
    _fields_ = [
        ("create_mutex", ctypes.c_void_p),
        ("destroy_mutex", ctypes.c_void_p),
        ("lock_mutex", ctypes.c_void_p),
        ("unlock_mutex", ctypes.c_void_p),
        ("flags", ctypes.c_ulong),
        ("reserved", ctypes.c_void_p),
    ]


def functions():  # type: ignore[no-untyped-def]
    lib = ctypes.CDLL(CLIENT)
    table = ctypes.c_void_p()
    rv = lib.C_GetFunctionList(ctypes.byref(table))
    assert rv == 0, rv
    slots = ctypes.cast(table.value + 8, ctypes.POINTER(ctypes.c_void_p))  # after CK_VERSION

    def fn(index: int, *argtypes):  # type: ignore[no-untyped-def]
        return ctypes.CFUNCTYPE(CK_RV, *argtypes)(slots[index])

    initialize = fn(C_INITIALIZE, ctypes.c_void_p)
    finalize = fn(C_FINALIZE, ctypes.c_void_p)
    wait = fn(
        C_WAIT_FOR_SLOT_EVENT, ctypes.c_ulong, ctypes.POINTER(ctypes.c_ulong), ctypes.c_void_p
    )
    return initialize, finalize, wait


def main(mode: str) -> int:
    initialize, finalize, wait = functions()
    args = InitArgs(flags=CKF_OS_LOCKING_OK)
    rv = initialize(ctypes.byref(args))
    print(f"initialize {rv:#x}", flush=True)
    result: dict[str, int] = {}

    def waiter() -> None:
        slot = ctypes.c_ulong(0xFFFF)
        result["rv"] = wait(0, ctypes.byref(slot), None)
        result["slot"] = slot.value

    thread = threading.Thread(target=waiter)
    thread.start()
    time.sleep(0.3)  # the wait is on the wire
    print("waiting", flush=True)
    if mode == "event":
        thread.join(30)
        print(f"wait {result.get('rv', -1):#x} slot {result.get('slot', -1)}", flush=True)
        print(f"finalize {finalize(None):#x}", flush=True)
    else:
        print(f"finalize {finalize(None):#x}", flush=True)
        thread.join(30)
        print(f"wait {result.get('rv', -1):#x}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
