# Benchmark: the CPU a pipelined ENC costs inside the daemon's connection loop, no socket.
"""Where a pipelined ``ENC`` spends its time: the connection loop alone, in process.

Runs the daemon's real ``Server._converse`` on a fresh store against a stand-in
socket. The socket hands it the same prebuilt batch of ``ENC`` lines again and
again: a fresh ``bytes`` each time, as ``recv`` gives. It swallows the replies.
The audit trail goes to a file, as in ``bench_kmsd.py``.

It prints the process CPU time per request beside the in-process recipe
(``KeyVersion.encrypt``). There is no kernel transport, so the gap between the two
is Python work: framing, parsing, base64, dispatch, counting, the audit trail. This
run cost the same per request as the live daemon's ``srv us/op``, which is how we
know the gap is not the socket.

Usage: ``python benchmarks/bench_converse.py [--size 64] [--batches 400] [--rounds 3]``.
``--source DIR`` measures another tree (a ``kms_server/`` and ``kms_client/`` copy).
"""

from __future__ import annotations

import argparse
import base64
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

RECEIVE_SIZE = 256 * 1024


def measure(size: int, batches: int, rounds: int) -> tuple[list[float], float]:
    """Per-request CPU microseconds of ``_converse`` (one per round) and of the recipe."""
    import trio  # noqa: PLC0415 - from the tree put on sys.path by main()

    from kms_client.protocol import Create  # noqa: PLC0415
    from kms_server.acl import Acl, Peer  # noqa: PLC0415
    from kms_server.audit import AuditLog  # noqa: PLC0415
    from kms_server.cli import utc_now  # noqa: PLC0415
    from kms_server.crypto import random_bytes  # noqa: PLC0415
    from kms_server.dispatch import Dispatcher  # noqa: PLC0415
    from kms_server.server import AccessControl, Limits, Reloaded, Server  # noqa: PLC0415
    from kms_server.store import KeyStore, init_store  # noqa: PLC0415

    work = Path(tempfile.mkdtemp(prefix="kmsc-"))
    try:
        kek = bytearray(random_bytes(32))
        init_store(work / "store", kek, {"kind": "file"}, utc_now())
        store = KeyStore(work / "store", kek, clock=utc_now)
        owner = Acl.owner_only(os.getuid())
        dispatcher = Dispatcher(store, "bench")
        audit = AuditLog(work / "audit.log")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as unused_listener:
            server = Server(
                dispatcher,
                unused_listener,
                Limits(),
                AccessControl(owner, None),
                audit,
                lambda: Reloaded(owner, None, None),
            )
            trio.run(dispatcher.respond_write, Create("bench", True), trio.to_thread.run_sync)
            line = b"ENC bench " + base64.b64encode(bytes(size)) + b"\n"
            batch = line * max(1, RECEIVE_SIZE // len(line))
            per_batch = batch.count(b"\n")
            peer = Peer(os.getpid(), os.getuid(), os.getgid(), frozenset(), None)

            class StandInSocket:
                def __init__(self) -> None:
                    self.left = batches

                async def recv(self, _size: int) -> bytes:
                    if not self.left:
                        return b""
                    self.left -= 1
                    return memoryview(batch).tobytes()  # a fresh object, as recv gives

                async def send(self, data: Any) -> int:
                    return len(data)

            class StandInStream:
                socket = StandInSocket()

            async def converse() -> None:
                await server._converse(StandInStream(), peer, 1)  # type: ignore[arg-type]

            results = []
            for _ in range(rounds):
                StandInStream.socket = StandInSocket()
                started = time.process_time()
                trio.run(converse)
                results.append((time.process_time() - started) / (batches * per_batch) * 1e6)
            key = store.usable("bench")
            plaintext = bytes(size)
            count = 20_000
            started = time.process_time()
            for _ in range(count):
                key.encrypt(plaintext, b"")
            recipe = (time.process_time() - started) / count * 1e6
            audit.close()
            store.close()
        return results, recipe
    finally:
        shutil.rmtree(work)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="plaintext bytes (default 64)")
    parser.add_argument("--batches", type=int, default=400, help="receives per round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument(
        "--source", type=Path, default=Path(__file__).resolve().parent.parent, help="tree"
    )
    args = parser.parse_args()
    sys.path.insert(0, str(args.source.resolve()))
    results, recipe = measure(args.size, args.batches, args.rounds)
    loop = statistics.median(results)
    print(f"source {args.source}; ENC of {args.size} B; {args.rounds} rounds")
    print(
        f"connection loop: {loop:.2f} us CPU per request (rounds: "
        + ", ".join(f"{r:.2f}" for r in results)
        + ")"
    )
    print(f"recipe alone:    {recipe:.2f} us CPU per request")
    print(
        f"recipe / loop:   {recipe / loop:.2f}"
        " (bench_kmsd.py's aims, in rates: 0.5 at 64 B, 0.6 at 8 KiB)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
