# Benchmark: a well-behaved client's latency with and without 200 misbehaving connections.
# Starts its own daemon over a throwaway store; exits 1 only if a good request failed.
"""kmsd under attack (issue 3, section 3): does a well-behaved client still get served?

One daemon (``kmsd serve``, a separate process over a fresh store with one
exportable key, its log and audit trail to a file), started with limits meant for
the attack: ``--max-connections 1024 --idle-timeout 5``. A well-behaved client
(raw blocking AF_UNIX socket, one request at a time, paced) measures the latency
of ``GET``, ``ENC`` of 64 bytes (both on one long-lived connection) and of a
``GET`` on a fresh connection, first on a quiet daemon, then while an attacker
process (asyncio) keeps 200 misbehaving connections going, in equal shares:

* ``oversized``: a line of ``--max-line`` + 1 KiB without LF, sent in 64 KiB
  writes; the daemon answers ``ERR TOO_LONG`` and closes; again after 0.5 s.
* ``slowloris``: ``GET `` and then one more byte every 0.5 s, never an LF; the
  daemon must close it within the idle timeout (plus its slack) of the first byte.
* ``garbage``: 4 KiB of random bytes (LFs included) every 50 ms, reading the
  ``ERR`` replies as they come.
* ``disconnect``: two requests and part of a third, then an abrupt close
  (``SO_LINGER`` 0: a reset) without reading; again after 100 ms.
* ``pipeliner``: 16 KiB of ``HELP`` requests (their 330 KB of replies overfill
  the socket buffers), then never reads a reply: the daemon blocks on its send
  and the idle timeout must free the connection; again at once.

Every good request must succeed (exactly the expected reply, within 10 s): the
run ends ``PASS`` or ``FAIL`` (exit status 1). Latencies are reported as p50 /
p99 / max per phase; also what the attackers saw (how long the daemon let a
slowloris or a pipeliner hold its connection, against the idle timeout) and the
daemon's CPU share. Everything runs on loopback Unix sockets in about 35 s.

Usage: ``python benchmarks/bench_attack.py [--quiet-seconds 10] [--attack-seconds 15]``
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import select
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_kmsd import KEY_ID, ROOT, ServerProcess, start_kmsd

ATTACKER = "--attacker"
KINDS = ("oversized", "slowloris", "garbage", "disconnect", "pipeliner")
REQUEST_TIMEOUT = 10.0
# How each kind paces itself (seconds): 200 misbehaving connections, not a connection flood.
SLOWLORIS_PERIOD = 0.5  # one byte each
OVERSIZED_PAUSE = 0.5  # after each overlong line is refused
GARBAGE_PAUSE = 0.05  # between 4 KiB bursts
DISCONNECT_PAUSE = 0.1  # between abrupt disconnects

# --------------------------------------------------------------------------- attacker process


@dataclass
class Tally:
    """What one kind of attacker did and saw."""

    connections: int = 0
    refused: int = 0  # connect failed or ERR UNAVAILABLE
    too_long: int = 0  # ERR TOO_LONG replies read
    err_replies: int = 0  # other ERR lines read
    bytes_sent: int = 0
    held: list[float] = field(default_factory=list)  # seconds until the daemon closed

    def summary(self) -> dict[str, Any]:
        held = sorted(self.held)
        return {
            "connections": self.connections,
            "refused": self.refused,
            "too_long": self.too_long,
            "err_replies": self.err_replies,
            "bytes_sent": self.bytes_sent,
            "closed_by_daemon": len(held),
            "held_median": statistics.median(held) if held else None,
            "held_max": held[-1] if held else None,
        }


class Attack:
    def __init__(self, path: str, max_line: int, pipeline_bytes: int) -> None:
        self.path = path
        self.max_line = max_line
        self.pipeline_bytes = pipeline_bytes
        self.tallies = {kind: Tally() for kind in KINDS}
        self.stopping = False

    async def connect(self, kind: str) -> socket.socket | None:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            await asyncio.get_running_loop().sock_connect(sock, self.path)
            sock.getpeername()  # EAGAIN (a full accept queue) leaves it unconnected
        except OSError:
            sock.close()
            self.tallies[kind].refused += 1
            await asyncio.sleep(0.1)
            return None
        self.tallies[kind].connections += 1
        return sock

    async def send(self, kind: str, sock: socket.socket, data: bytes) -> bool:
        try:
            await asyncio.get_running_loop().sock_sendall(sock, data)
        except OSError:
            return False
        self.tallies[kind].bytes_sent += len(data)
        return True

    def count_replies(self, kind: str, data: bytes) -> None:
        tally = self.tallies[kind]
        tally.too_long += data.count(b"ERR TOO_LONG")
        tally.err_replies += data.count(b"ERR ") - data.count(b"ERR TOO_LONG")
        if b"ERR UNAVAILABLE" in data:
            tally.refused += 1

    async def drain_until_closed(self, kind: str, sock: socket.socket, limit: float) -> bool:
        """Read (and count) replies until the daemon closes, for at most ``limit`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limit
        while (left := deadline - loop.time()) > 0:
            try:
                data = await asyncio.wait_for(loop.sock_recv(sock, 65536), left)
            except TimeoutError:
                return False
            except OSError:  # a reset: closed with our bytes unread
                return True
            if not data:
                return True
            self.count_replies(kind, data)
        return False

    async def oversized(self) -> None:
        line = b"GET " + b"A" * (self.max_line + 1024)
        chunks = [line[i : i + 65536] for i in range(0, len(line), 65536)]
        while not self.stopping:
            sock = await self.connect("oversized")
            if sock is None:
                continue
            with sock:
                for chunk in chunks:
                    if not await self.send("oversized", sock, chunk):
                        break
                await self.drain_until_closed("oversized", sock, 10.0)
            await asyncio.sleep(OVERSIZED_PAUSE)

    async def slowloris(self) -> None:
        loop = asyncio.get_running_loop()
        while not self.stopping:
            sock = await self.connect("slowloris")
            if sock is None:
                continue
            with sock:
                began = loop.time()
                await self.send("slowloris", sock, b"GET ")
                while not self.stopping:
                    try:
                        data = await asyncio.wait_for(loop.sock_recv(sock, 4096), SLOWLORIS_PERIOD)
                    except TimeoutError:
                        if not await self.send("slowloris", sock, b"x"):
                            self.tallies["slowloris"].held.append(loop.time() - began)
                            break
                        continue
                    except OSError:
                        data = b""
                    if not data:
                        self.tallies["slowloris"].held.append(loop.time() - began)
                        break
                    self.count_replies("slowloris", data)

    async def garbage(self) -> None:
        randbytes = random.Random(os.getpid()).randbytes
        while not self.stopping:
            sock = await self.connect("garbage")
            if sock is None:
                continue
            with sock:
                while not self.stopping and await self.send("garbage", sock, randbytes(4096)):
                    await asyncio.sleep(GARBAGE_PAUSE)
                    if not self.read_ready("garbage", sock):
                        break

    def read_ready(self, kind: str, sock: socket.socket) -> bool:
        """Read (and count) the replies already there; False once the daemon has closed."""
        try:
            while data := sock.recv(65536):
                self.count_replies(kind, data)
        except BlockingIOError:
            return True
        except OSError:
            return False
        return False

    async def disconnect(self) -> None:
        request = f"GET {KEY_ID}\nENC {KEY_ID} aGk=\nGE".encode()
        linger = struct.pack("ii", 1, 0)
        while not self.stopping:
            sock = await self.connect("disconnect")
            if sock is None:
                continue
            with sock:
                await self.send("disconnect", sock, request)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
            await asyncio.sleep(DISCONNECT_PAUSE)

    async def pipeliner(self) -> None:
        loop = asyncio.get_running_loop()
        line = b"HELP\n"  # ~20x as many bytes back: the replies soon fill the socket buffers
        blob = line * (self.pipeline_bytes // len(line))
        hangup = select.POLLHUP | select.POLLRDHUP | select.POLLERR
        while not self.stopping:
            sock = await self.connect("pipeliner")
            if sock is None:
                continue
            with sock:
                began = loop.time()
                await self.send("pipeliner", sock, blob)
                poller = select.poll()
                poller.register(sock, hangup)
                while not self.stopping:  # never read: wait for the daemon to give up on us
                    if poller.poll(0):
                        self.tallies["pipeliner"].held.append(loop.time() - began)
                        break
                    await asyncio.sleep(0.1)

    async def run(self, count: int, ready: Callable[[], None]) -> None:
        loop = asyncio.get_running_loop()
        stop = asyncio.Event()
        loop.add_reader(sys.stdin.fileno(), stop.set)  # the parent closes our stdin to stop us
        workers = [getattr(self, kind) for kind in KINDS]
        tasks = [asyncio.create_task(workers[n % len(KINDS)]()) for n in range(count)]
        await asyncio.sleep(0.5)
        ready()
        await stop.wait()
        self.stopping = True
        await asyncio.sleep(0.6)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def run_attacker(path: str, count: int, max_line: int, pipeline_bytes: int) -> int:
    attack = Attack(path, max_line, pipeline_bytes)

    def ready() -> None:
        print("ready", flush=True)

    asyncio.run(attack.run(count, ready))
    print(json.dumps({kind: tally.summary() for kind, tally in attack.tallies.items()}))
    return 0


# --------------------------------------------------------------------------- the good client


@dataclass
class Latencies:
    ok: list[float] = field(default_factory=list)
    failed: int = 0
    errors: list[str] = field(default_factory=list)

    def add_failure(self, what: str) -> None:
        self.failed += 1
        if len(self.errors) < 5:
            self.errors.append(what)


def read_line(sock: socket.socket) -> bytes:
    reply = sock.recv(65536)
    while reply[-1:] != b"\n":
        more = sock.recv(65536)
        if not more:
            raise ConnectionError(f"daemon closed the connection after {reply[:60]!r}")
        reply += more
    return reply


class GoodClient:
    """One request at a time, paced; every reply checked exactly."""

    def __init__(self, path: str, interval: float) -> None:
        self.path = path
        self.interval = interval
        self.sock: socket.socket | None = None
        self.get_request = f"GET {KEY_ID}\n".encode()
        self.enc_request = f"ENC {KEY_ID} {base64.b64encode(os.urandom(64)).decode()}\n".encode()
        self.get_reply = self.exchange_new(self.get_request)
        self.enc_size = len(self.exchange_new(self.enc_request))
        if not self.get_reply.startswith(b"OK ") or self.enc_size < 64:
            raise RuntimeError(f"the daemon refused the good client: {self.get_reply!r}")

    def connect(self) -> socket.socket:
        """A blocking connect: it waits (up to the timeout) for room in a full accept queue,
        where a non-blocking one (``settimeout`` first) fails at once with EAGAIN."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        wait = struct.pack("ll", int(REQUEST_TIMEOUT), 0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, wait)
        try:
            sock.connect(self.path)
        except OSError:
            sock.close()
            raise
        sock.settimeout(REQUEST_TIMEOUT)
        return sock

    def exchange_new(self, request: bytes) -> bytes:
        with self.connect() as sock:
            sock.sendall(request)
            return read_line(sock)

    def persistent(self) -> socket.socket:
        if self.sock is None:
            self.sock = self.connect()
        return self.sock

    def one(self, kind: str) -> None:
        """One request; raises on any failure (a wrong reply, a timeout, a closed socket)."""
        if kind == "GET + connect":
            reply = self.exchange_new(self.get_request)
            if reply != self.get_reply:
                raise RuntimeError(f"unexpected reply {reply[:80]!r}")
            return
        sock = self.persistent()
        if kind == "GET":
            sock.sendall(self.get_request)
            reply = read_line(sock)
            if reply != self.get_reply:
                raise RuntimeError(f"unexpected reply {reply[:80]!r}")
        else:
            sock.sendall(self.enc_request)
            reply = read_line(sock)
            if not reply.startswith(b"OK ") or len(reply) != self.enc_size:
                raise RuntimeError(f"unexpected reply {reply[:80]!r}")

    def run(self, seconds: float) -> dict[str, Latencies]:
        results = {kind: Latencies() for kind in ("GET", "ENC 64 B", "GET + connect")}
        order = ["GET", "ENC 64 B"] * 4 + ["GET + connect"]
        deadline = time.monotonic() + seconds
        step = 0
        while time.monotonic() < deadline:
            kind = order[step % len(order)]
            step += 1
            began = time.perf_counter()
            try:
                self.one(kind)
            except (OSError, RuntimeError) as exc:
                results[kind].add_failure(f"{kind}: {type(exc).__name__}: {exc}")
                if self.sock is not None:
                    self.sock.close()
                    self.sock = None
            else:
                results[kind].ok.append(time.perf_counter() - began)
            time.sleep(self.interval)
        return results

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


# --------------------------------------------------------------------------- report


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


def cpu_share(daemon: ServerProcess, work: Callable[[], Any]) -> tuple[Any, float]:
    before, began = daemon.cpu_seconds(), time.monotonic()
    result = work()
    after, elapsed = daemon.cpu_seconds(), time.monotonic() - began
    share = (after - before) / elapsed if before is not None and after is not None else 0.0
    return result, share


def print_latencies(phases: dict[str, dict[str, Latencies]]) -> None:
    header = (
        f"{'request':<16}{'phase':<14}{'requests':>9}{'failed':>8}"
        f"{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
    )
    print(header)
    print("-" * len(header))
    for kind in ("GET", "ENC 64 B", "GET + connect"):
        for phase, results in phases.items():
            lat = results[kind]
            if lat.ok:
                p50, p99 = percentile(lat.ok, 0.50) * 1e3, percentile(lat.ok, 0.99) * 1e3
                figures = f"{p50:>9.2f}{p99:>9.2f}{max(lat.ok) * 1e3:>9.1f}"
            else:
                figures = f"{'-':>9}{'-':>9}{'-':>9}"
            print(f"{kind:<16}{phase:<14}{len(lat.ok) + lat.failed:>9}{lat.failed:>8}{figures}")
    print()
    print(f"{'p50 / p99 ratio, attack / quiet':<30}")
    quiet, attack = phases["quiet"], phases["under attack"]
    for kind in ("GET", "ENC 64 B", "GET + connect"):
        if quiet[kind].ok and attack[kind].ok:
            ratio50 = percentile(attack[kind].ok, 0.5) / percentile(quiet[kind].ok, 0.5)
            ratio99 = percentile(attack[kind].ok, 0.99) / percentile(quiet[kind].ok, 0.99)
            print(f"  {kind:<14} p50 x{ratio50:.1f}   p99 x{ratio99:.1f}")


def print_attackers(stats: dict[str, Any], idle_timeout: float) -> None:
    slack = min(1.0, idle_timeout / 16)
    print(
        f"{'attacker':<12}{'conns':>7}{'refused':>8}{'MB sent':>9}{'TOO_LONG':>9}"
        f"{'ERR':>8}{'cut':>6}{'held p50 s':>11}{'held max s':>11}"
    )
    for kind in KINDS:
        s = stats.get(kind)
        if s is None:
            continue
        held50 = f"{s['held_median']:.2f}" if s["held_median"] is not None else "-"
        held_max = f"{s['held_max']:.2f}" if s["held_max"] is not None else "-"
        print(
            f"{kind:<12}{s['connections']:>7}{s['refused']:>8}{s['bytes_sent'] / 1e6:>9.1f}"
            f"{s['too_long']:>9}{s['err_replies']:>8}{s['closed_by_daemon']:>6}"
            f"{held50:>11}{held_max:>11}"
        )
    print(
        f"(cut/held: connections the daemon closed, and after how long; its idle timeout is "
        f"{idle_timeout:g} s, acting within {idle_timeout:g}-{idle_timeout + slack:g} s of when "
        "it starts waiting)"
    )


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quiet-seconds", type=float, default=10.0)
    parser.add_argument("--attack-seconds", type=float, default=15.0)
    parser.add_argument("--attackers", type=int, default=200, help="misbehaving connections")
    parser.add_argument("--interval", type=float, default=0.002, help="good client's pause (s)")
    parser.add_argument("--idle-timeout", type=float, default=5.0)
    parser.add_argument("--max-connections", type=int, default=1024)
    parser.add_argument("--max-line", type=int, default=1 << 20)
    parser.add_argument("--pipeline-bytes", type=int, default=16 * 1024)
    parser.add_argument(
        "--source",
        type=lambda text: Path(text).resolve(),
        default=ROOT,
        metavar="DIR",
        help="source tree of the kmsd to attack (default: this checkout)",
    )
    return parser.parse_args()


def main() -> int:
    if sys.argv[1:2] == [ATTACKER]:
        path, count, max_line, pipeline_bytes = sys.argv[2:6]
        return run_attacker(path, int(count), int(max_line), int(pipeline_bytes))
    args = parse_args()
    work = Path(tempfile.mkdtemp(prefix="kmsa-", dir="/tmp"))
    limits = (
        "--max-connections",
        str(args.max_connections),
        "--idle-timeout",
        str(args.idle_timeout),
        "--max-line",
        str(args.max_line),
    )
    daemon = start_kmsd(work / "d", "kmsd", args.source, extra_args=limits)
    attacker: subprocess.Popen[str] | None = None
    try:
        print(f"kmsd pid {daemon.pid}: {' '.join(limits)}; work dir {work}", flush=True)
        load_before = os.getloadavg()[0]
        client = GoodClient(daemon.socket_path, args.interval)
        quiet, quiet_cpu = cpu_share(daemon, lambda: client.run(args.quiet_seconds))
        print(f"quiet phase done ({args.quiet_seconds:g} s)", flush=True)
        attacker = subprocess.Popen(
            [
                *(sys.executable, str(Path(__file__).resolve()), ATTACKER, daemon.socket_path),
                *(str(args.attackers), str(args.max_line), str(args.pipeline_bytes)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env={**os.environ, "PYTHONPATH": str(args.source)},
        )
        assert attacker.stdout is not None
        assert attacker.stdin is not None
        if attacker.stdout.readline().strip() != "ready":
            raise RuntimeError("the attacker did not start")
        print(f"attack started: {args.attackers} connections", flush=True)
        attacked, attack_cpu = cpu_share(daemon, lambda: client.run(args.attack_seconds))
        attacker.stdin.close()
        stats = json.loads(attacker.stdout.read() or "{}")
        attacker.wait(10)
        print(f"attack phase done ({args.attack_seconds:g} s)", flush=True)
        client.close()
        after = GoodClient(daemon.socket_path, args.interval)  # still serving afterwards?
        after.close()
        load_after = os.getloadavg()[0]
    finally:
        if attacker is not None and attacker.poll() is None:
            attacker.kill()
            attacker.wait()
        daemon.stop()
        shutil.rmtree(work, ignore_errors=True)

    phases = {"quiet": quiet, "under attack": attacked}
    return report(phases, stats, args, (quiet_cpu, attack_cpu), (load_before, load_after))


def report(
    phases: dict[str, dict[str, Latencies]],
    stats: dict[str, Any],
    args: argparse.Namespace,
    cpu: tuple[float, float],
    load: tuple[float, float],
) -> int:
    """Print the figures; 0 when every good request succeeded, else 1."""
    print()
    print(
        f"machine: {os.cpu_count()} CPUs; Python {sys.version.split()[0]}; load average "
        f"{load[0]:.2f} before, {load[1]:.2f} after (1 min); daemon CPU "
        f"{cpu[0]:.0%} quiet, {cpu[1]:.0%} under attack (100% = one core)"
    )
    print(
        f"good client: one request at a time, {args.interval * 1e3:g} ms apart, cycling "
        "GET and ENC 64 B on one connection, every 9th a GET on a new connection"
    )
    print(
        f"attack: {args.attackers} connections, {args.attackers // len(KINDS)} of each kind "
        f"({', '.join(KINDS)})"
    )
    print()
    print_latencies(phases)
    print()
    print_attackers(stats, args.idle_timeout)
    print()
    total = sum(len(lat.ok) + lat.failed for results in phases.values() for lat in results.values())
    failed = sum(lat.failed for results in phases.values() for lat in results.values())
    for results in phases.values():
        for lat in results.values():
            for error in lat.errors:
                print(f"  failure: {error}")
    if failed:
        print(f"FAIL: {failed} of {total} good requests failed")
        return 1
    print(f"PASS: all {total} good requests succeeded, quiet and under attack")
    return 0


if __name__ == "__main__":
    sys.exit(main())
