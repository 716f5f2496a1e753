"""A bench-only daemon launcher: tokend with N demo-provisioned virtual PIV cards, each in
its own in-process reader (``tokend serve --simulate piv`` makes exactly one).

    python -m bench.launcher --socket /tmp/x/tokend.sock --tokens 16 [--export-dir DIR]

It wires the same pieces as ``tokend serve`` (`tokend.wiring.build_registry`, Engine,
Daemon) and stops on SIGTERM/SIGINT.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from tokend.daemon import Daemon
from tokend.session import Engine
from tokend.simulators.demo import provision_demo
from tokend.simulators.memory import MemoryReader, MemoryWatcher
from tokend.simulators.piv import VirtualPivCard
from tokend.wiring import build_registry


def build_readers(count: int, export_dir: Path | None = None) -> list[MemoryReader]:
    """``count`` readers, each holding a freshly provisioned demo card (card i's
    certificates go to ``export_dir/card<i>``)."""
    readers = []
    for i in range(count):
        card = VirtualPivCard()
        provision_demo(
            card, export_dir / f"card{i}" if export_dir is not None else None, key_agreement=True
        )
        reader = MemoryReader(f"Bench Reader {i}")
        reader.insert(card)
        readers.append(reader)
    return readers


async def serve(socket: Path, readers: list[MemoryReader]) -> None:
    registry = build_registry(watchers=[MemoryWatcher(*readers)])
    daemon = Daemon(Engine(registry), socket)
    await daemon.start()
    await daemon.serve_until_stopped()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.launcher")
    parser.add_argument("--socket", type=Path, required=True)
    parser.add_argument("--tokens", type=int, default=1)
    parser.add_argument("--export-dir", type=Path)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    readers = build_readers(args.tokens, args.export_dir)
    asyncio.run(serve(args.socket, readers))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
