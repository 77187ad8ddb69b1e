# Benchmark: kmsd GET/ENC rates beside a minimal trio echo server and the in-process recipe.
# Starts its own daemons over throwaway stores; reports medians and ratios, never asserts timings.
"""Measure kmsd against its two natural ceilings, in one run, and print ratios.

Subjects (all measured in the same run, rounds interleaved to spread the noise
of a shared machine, the median of the rounds reported):

* ``echo``: a minimal trio server on the same socket kind (AF_UNIX stream), run
  as a separate process like the daemon, written in the daemon's style: the
  trio socket's own ``recv(256 KiB)`` and ``send``, one fixed reply per complete
  line, one send per batch. It is the transport ceiling: trio + Python + kernel. ``echo`` answers
  ``OK PONG``; ``echo 8 KiB`` answers a line as long as kmsd's reply to an
  8 KiB ``ENC`` and is sent the same request bytes, so it moves the same bytes.
* ``kmsd``: the real daemon (``python -m kms_server serve``), a separate process
  over a fresh store holding one exportable key. Its stderr (log and, by
  default, the audit trail) goes to a file in the work directory.
* ``kmsd [null audit]``: the same daemon of the baseline tree, run by this script
  in a subprocess with an audit sink that formats and writes nothing, on the hot
  subjects (``AUDIT_SUBJECTS``), to price the audit trail (issue 3: at most 10%).
* ``local``: ``KeyVersion.encrypt(plaintext, b"")`` in a tight loop in this
  process (the recipe every ``ENC`` runs), and the same plus the protocol's
  base64 encoder (the least the daemon must do per ``ENC`` besides decoding).

The load driver is Python: a raw blocking AF_UNIX socket. Sequential = send one
request, wait for its whole reply line, repeat. Pipelined = a sender thread
keeps a window of requests in flight (prebuilt bytes, sent in chunks) while the
main thread reads into a reused buffer and counts the fixed-size replies by
bytes (never scanning them). The client's cost is the same for echo and kmsd,
so their ratio is fair; the absolute rates are those of this client here.

``--source DIR`` measures the kmsd of another source tree (``DIR`` holding
``kms_server/`` and ``kms_client/``); ``--candidate DIR`` (repeatable) adds one
more kmsd from such a tree to the same rounds, so baseline and candidates share
the noise, and prints candidate/baseline ratios; its subjects are suffixed
``[<DIR name>]``. ``--only NAME`` keeps a subset, e.g. to hold a steady load
while a profiler samples the daemon (its pid is printed first).

Usage: ``python benchmarks/bench_kmsd.py [--quick] [--candidate DIR]``; see README.md.
"""

from __future__ import annotations

import argparse
import binascii
import os
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
KEY_ID = "bench"
REPLY_PONG = b"OK PONG\n"
RECEIVE_SIZE = 256 * 1024  # the daemon's kms_server.server.RECEIVE_SIZE
START_TIMEOUT = 20.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# --------------------------------------------------------------------------- echo server


def count_lines(data: bytes) -> int:
    """The LFs in ``data``: ``count`` for short lines, memchr-backed ``find`` for long ones.

    ``bytes.count`` walks byte by byte (about 20 us for 64 KiB here); ``find`` skips
    through an 11 KB line with memchr, as the daemon's framer does.
    """
    index = data.find(b"\n")
    if index < 0:
        return 0
    if index < 256:
        return data.count(b"\n")
    lines = 0
    while index >= 0:
        lines += 1
        index = data.find(b"\n", index + 1)
    return lines


def serve_echo(path: str, reply_size: int) -> None:
    """The echo subject: the daemon's connection loop with nothing but a fixed reply.

    The reply is ``OK PONG`` or, for ``reply_size`` > 8, ``OK AAAA...`` of that
    size (LF included), to move as many bytes as a daemon reply does.
    """
    import trio  # noqa: PLC0415 - only the echo subprocess needs trio

    reply = (
        REPLY_PONG if reply_size <= len(REPLY_PONG) else b"OK " + b"A" * (reply_size - 4) + b"\n"
    )

    async def handle(stream: trio.SocketStream) -> None:
        # The daemon's I/O: the trio socket's own recv and send (not SocketStream's wrappers).
        recv, send = stream.socket.recv, stream.socket.send
        try:
            while True:
                data = await recv(RECEIVE_SIZE)
                if not data:
                    return
                complete = count_lines(data)
                if complete:
                    batch = reply * complete
                    sent = await send(batch)
                    with memoryview(batch) as view:
                        while sent < len(batch):
                            sent += await send(view[sent:])
        except OSError:
            pass
        finally:
            await trio.aclose_forcefully(stream)

    async def main() -> None:
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(path)
        listener.listen(socket.SOMAXCONN)
        trio_listener = trio.SocketListener(trio.socket.from_stdlib_socket(listener))
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.serve_listeners, handle, [trio_listener])
                async for _ in signals:
                    nursery.cancel_scope.cancel()
                    break

    trio.run(main)


# --------------------------------------------------------------------------- null audit sink

NULL_AUDIT = "--serve-kmsd-null-audit"


def serve_kmsd_null_audit(argv: list[str]) -> int:
    """Run ``kmsd`` (``argv`` as its command line) in this process with a null audit sink.

    The daemon is the real one; only its :class:`~kms_server.audit.AuditLog` is replaced
    by one that formats and writes nothing, so the audit trail's cost is what a daemon
    with the trail (to a file) spends beyond this one. No product flag turns auditing off.
    """
    from kms_server import cli  # noqa: PLC0415 - from the measured source tree
    from kms_server.audit import AuditLog  # noqa: PLC0415

    class NullAuditLog(AuditLog):
        def head(self, prefix: str) -> str:
            return ""

        @staticmethod
        def subject(*args: object) -> str:
            return ""

        @staticmethod
        def tail(micros: int) -> str:
            return ""

        def write(self, parts: list[str]) -> None:
            pass

    cli.AuditLog = NullAuditLog  # type: ignore[attr-defined]
    cli.main(argv, prog_name="kmsd")
    return 0


# --------------------------------------------------------------------------- subprocesses


def exchange(path: str, payload: bytes, timeout: float = 2.0) -> bytes:
    """One request/reply on a fresh connection (readiness probes and set-up)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
        conn.settimeout(timeout)
        conn.connect(path)
        conn.sendall(payload)
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = conn.recv(RECEIVE_SIZE)
            if not chunk:
                break
            reply += chunk
    return reply


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux /proc), or None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


@dataclass
class ServerProcess:
    name: str
    command: list[str]
    socket_path: str
    log_path: Path
    source: Path = ROOT
    process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, "PYTHONPATH": str(self.source)}
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(
                self.command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                cwd=self.source,
                env=env,
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"{self.name} exited early:\n{self.log_path.read_text()}")
            try:
                if exchange(self.socket_path, b"PING\n").startswith(b"OK "):
                    return
            except OSError:
                pass
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.name} did not start:\n{self.log_path.read_text()}")

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def cpu_seconds(self) -> float | None:
        return cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None


def start_kmsd(
    work: Path,
    name: str,
    source: Path,
    *,
    null_audit: bool = False,
    extra_args: tuple[str, ...] = (),
) -> ServerProcess:
    """``kmsd init`` a fresh store with a random KEK file, serve it, create one exportable key.

    Both steps run the source tree's own command line, so any tree can be measured.
    ``null_audit`` serves through :func:`serve_kmsd_null_audit` (this script, in-process);
    ``extra_args`` go to ``kmsd serve`` (limits, for instance).
    """
    work.mkdir(mode=0o700)
    kek_file = work / "kek"
    kek_file.write_bytes(os.urandom(32).hex().encode() + b"\n")
    kek_file.chmod(0o600)
    store = work / "store"
    kmsd = [sys.executable, "-m", "kms_server"]
    serve = [sys.executable, str(Path(__file__).resolve()), NULL_AUDIT] if null_audit else kmsd
    subprocess.run(
        [*kmsd, "init", "--store", str(store), "--kek-file", str(kek_file)],
        cwd=source,
        env={**os.environ, "PYTHONPATH": str(source)},
        check=True,
        capture_output=True,
    )
    socket_path = str(work / "kms.sock")
    command = [*serve, "serve", "--store", str(store), "--socket", socket_path]
    command += ["--kek-file", str(kek_file), *extra_args]
    daemon = ServerProcess(name, command, socket_path, work / "kmsd.log", source)
    daemon.start()
    reply = exchange(socket_path, f"CREATE {KEY_ID} exportable\n".encode(), timeout=10.0)
    if reply != b"OK 1\n":
        daemon.stop()
        raise RuntimeError(f"CREATE failed on {name}: {reply!r}")
    return daemon


def start_echo(work: Path, name: str, reply_size: int = len(REPLY_PONG)) -> ServerProcess:
    socket_path = str(work / f"{name}.sock")
    command = [sys.executable, str(Path(__file__).resolve()), "--serve-echo", socket_path]
    command += ["--echo-reply-size", str(reply_size)]
    echo = ServerProcess(name, command, socket_path, work / f"{name}.log")
    echo.start()
    return echo


# --------------------------------------------------------------------------- load drivers


@dataclass
class Sample:
    ops: int
    seconds: float
    server_cpu: float | None  # seconds of server CPU during the sample
    client_cpu: float  # seconds of this process's CPU (all threads) during the sample

    @property
    def rate(self) -> float:
        return self.ops / self.seconds


def reply_size(conn: socket.socket, request: bytes) -> int:
    """Two untimed exchanges: the subject must answer ``OK`` with replies of one fixed size.

    Every subject's reply has a fixed length (same key, same plaintext size), so
    the drivers count replies by bytes and detect an ``ERR`` by a length mismatch.
    """
    sizes = set()
    for _ in range(2):
        conn.sendall(request)
        reply = b""
        while not reply.endswith(b"\n"):
            reply += conn.recv(RECEIVE_SIZE)
        if not reply.startswith(b"OK "):
            raise RuntimeError(f"subject refused {request[:40]!r}...: {reply[:200]!r}")
        sizes.add(len(reply))
    if len(sizes) != 1:
        raise RuntimeError(f"replies to {request[:40]!r}... vary in size: {sizes}")
    return sizes.pop()


def sequential(conn: socket.socket, request: bytes, size: int, seconds: float) -> tuple[int, float]:
    """Send one request, wait for its whole reply line, repeat until ``seconds`` pass."""
    send, recv = conn.sendall, conn.recv
    ops = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(32):
            send(request)
            reply = recv(RECEIVE_SIZE)
            while reply[-1:] != b"\n":
                more = recv(RECEIVE_SIZE)
                if not more:
                    raise ConnectionError("server closed the connection")
                reply += more
            if len(reply) != size:
                raise RuntimeError(f"unexpected reply: {reply[:200]!r}")
        ops += 32
        now = time.perf_counter()
        if now >= deadline:
            return ops, now - start


class Sender(threading.Thread):
    """Writes a prebuilt chunk of requests whenever a chunk's worth of credit is free."""

    def __init__(self, conn: socket.socket, blob: bytes, credits: int, deadline: float) -> None:
        super().__init__(daemon=True)
        self.conn, self.blob, self.deadline = conn, blob, deadline
        self.credits = threading.Semaphore(credits)
        self.done = threading.Event()
        self.sent_chunks = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while True:
                self.credits.acquire()
                if time.perf_counter() >= self.deadline:
                    break
                self.conn.sendall(self.blob)
                self.sent_chunks += 1
        except BaseException as exc:  # reported by the reader
            self.error = exc
        finally:
            self.done.set()


def pipelined(
    conn: socket.socket, request: bytes, size: int, seconds: float, window: int, chunk: int
) -> tuple[int, float]:
    """Keep ``window`` requests in flight, sent ``chunk`` at a time, for ``seconds``.

    A :class:`Sender` thread writes; this thread reads into a reused buffer, counts
    replies by bytes (each is ``size`` long; the first reply starting in each read
    must begin ``OK``, and the total must be whole replies) and returns credit.
    The rate is the replies counted over the time from the first send to the last
    reply. The client never scans the reply bytes: for 8 KiB replies a
    ``count(b"\\n")`` alone costs this client several microseconds per request.
    """
    start = time.perf_counter()
    sender = Sender(conn, request * chunk, max(1, window // chunk), start + seconds)
    sender.start()
    poller = select.poll()
    poller.register(conn, select.POLLIN)
    buffer = bytearray(1 << 20)  # reused: a fresh 1 MiB bytes per recv costs page faults
    recv_into = conn.recv_into
    received = returned = total = bad = 0
    last = start
    while True:
        if received >= sender.sent_chunks * chunk:
            # Caught up with everything sent so far: finished, or wait briefly for more.
            if sender.done.is_set() and received >= sender.sent_chunks * chunk:
                break
            if not poller.poll(10):
                continue
        got = recv_into(buffer)
        if not got:
            raise ConnectionError("server closed the connection")
        last = time.perf_counter()
        first = -total % size  # where the first reply starting in this read begins
        if first + 3 <= got and buffer[first : first + 3] != b"OK ":
            bad += 1
        total += got
        received = total // size
        while received - returned >= chunk:
            returned += chunk
            sender.credits.release()
    sender.join()
    if sender.error is not None:
        raise sender.error
    if bad or total != received * size:
        raise RuntimeError("a reply was not the expected OK line (an ERR?)")
    return received, last - start


def in_process(call: Callable[[], object], seconds: float) -> tuple[int, float]:
    ops = 0
    start = time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(256):
            call()
        ops += 256
        now = time.perf_counter()
        if now >= deadline:
            return ops, now - start


# --------------------------------------------------------------------------- subjects


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


@dataclass
class Subject:
    name: str
    kind: str  # "seq", "pipe" or "local"
    run: Callable[[float], tuple[int, float]]
    server: ServerProcess | None = None
    samples: list[Sample] = field(default_factory=list)

    def measure(self, seconds: float) -> None:
        server_before = self.server.cpu_seconds() if self.server else None
        client_before = os.times()
        ops, elapsed = self.run(seconds)
        client_after = os.times()
        server_after = self.server.cpu_seconds() if self.server else None
        server_cpu = None
        if server_before is not None and server_after is not None:
            server_cpu = server_after - server_before
        client_cpu = (client_after.user + client_after.system) - (
            client_before.user + client_before.system
        )
        self.samples.append(Sample(ops, elapsed, server_cpu, client_cpu))

    @property
    def median_rate(self) -> float:
        return median([sample.rate for sample in self.samples])


def socket_subject(
    name: str, kind: str, server: ServerProcess, request: bytes, window: int, chunk: int
) -> Subject:
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    conn.connect(server.socket_path)
    size = reply_size(conn, request)

    def run(seconds: float) -> tuple[int, float]:
        if kind == "seq":
            return sequential(conn, request, size, seconds)
        return pipelined(conn, request, size, seconds, window, chunk)

    return Subject(name, kind, run, server)


def local_subject(name: str, call: Callable[[], object]) -> Subject:
    return Subject(name, "local", lambda seconds: in_process(call, seconds))


def enc_line(plaintext: bytes) -> bytes:
    return b"ENC " + KEY_ID.encode() + b" " + binascii.b2a_base64(plaintext, newline=False) + b"\n"


@dataclass
class Recipe:
    """The in-process recipe: one key version, the protocol's encoder, the plaintexts."""

    encrypt: Callable[[bytes, bytes], bytes]
    b64encode: Callable[[bytes], bytes]
    small: bytes = field(default_factory=lambda: os.urandom(64))
    large: bytes = field(default_factory=lambda: os.urandom(8192))

    @classmethod
    def load(cls) -> Recipe:
        from kms_client.protocol import b64encode  # noqa: PLC0415 - the daemon's encoder
        from kms_server.keys import KeyVersion  # noqa: PLC0415

        key = KeyVersion(KEY_ID, 1, "2026-01-01T00:00:00Z", True, bytearray(os.urandom(32)))
        return cls(key.encrypt, b64encode)

    def enc_reply_size(self, plaintext: bytes) -> int:
        return len(b"OK " + self.b64encode(self.encrypt(plaintext, b"")) + b"\n")


def build_subjects(
    recipe: Recipe,
    echoes: tuple[ServerProcess, ServerProcess],
    daemons: list[tuple[str, ServerProcess]],
    window: int,
    chunk: int,
    null_audit: ServerProcess | None = None,
) -> list[Subject]:
    echo, echo_large = echoes
    encrypt, b64encode, small, large = recipe.encrypt, recipe.b64encode, recipe.small, recipe.large
    subjects = [
        local_subject("local ENC 64 B", lambda: encrypt(small, b"")),
        local_subject("local ENC 64 B +b64", lambda: b64encode(encrypt(small, b""))),
        local_subject("local ENC 8 KiB", lambda: encrypt(large, b"")),
        local_subject("local ENC 8 KiB +b64", lambda: b64encode(encrypt(large, b""))),
        socket_subject("seq echo", "seq", echo, b"PING\n", window, chunk),
        socket_subject("pipe echo", "pipe", echo, b"PING\n", window, chunk),
        socket_subject("pipe echo 8 KiB", "pipe", echo_large, enc_line(large), window, chunk),
    ]
    requests = [
        ("GET", f"GET {KEY_ID}\n".encode()),
        ("ENC 64 B", enc_line(small)),
        ("ENC 8 KiB", enc_line(large)),
    ]
    for suffix, daemon in daemons:
        for kind in ("seq", "pipe"):
            for label, request in requests:
                if kind == "seq" and label == "ENC 8 KiB":
                    continue
                name = f"{kind} {label}{suffix}"
                subjects.append(socket_subject(name, kind, daemon, request, window, chunk))
    if null_audit is not None:
        for base in AUDIT_SUBJECTS:
            kind, label = base.split(" ", 1)
            request = dict(requests)[label]
            name = base + NULL_AUDIT_SUFFIX
            subjects.append(socket_subject(name, kind, null_audit, request, window, chunk))
    return subjects


# --------------------------------------------------------------------------- report

AIMS = [
    # (numerator, denominator, aim)
    ("seq GET", "seq echo", 0.8),
    ("pipe ENC 64 B", "local ENC 64 B", 0.5),
    ("pipe ENC 8 KiB", "local ENC 8 KiB", 0.6),
]
CONTEXT = [
    ("seq ENC 64 B", "seq echo"),
    ("pipe GET", "pipe echo"),
    ("pipe ENC 64 B", "local ENC 64 B +b64"),
    ("pipe ENC 8 KiB", "local ENC 8 KiB +b64"),
    ("pipe ENC 8 KiB", "pipe echo 8 KiB"),
]


#: The hot-path subjects also measured on a daemon with a null audit sink (issue 3, section 2).
AUDIT_SUBJECTS = ["seq GET", "pipe GET", "pipe ENC 64 B"]
NULL_AUDIT_SUFFIX = " [null audit]"
AUDIT_AIM = 0.10  # the audit trail may slow the hot path by at most 10%

LABEL = 52  # width of the ratio labels


def candidate_suffix(source: Path) -> str:
    return f" [{source.name}]"


def revision(source: Path) -> str:
    """The git commit of ``source`` (``+dirty`` with uncommitted changes), if it is a checkout."""
    try:
        head = subprocess.run(
            ["git", "-C", str(source), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(source), "status", "--porcelain", "--", "kms_server", "kms_client"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "not a git checkout"
    return head + ("+dirty" if dirty else "")


def print_table(subjects: list[Subject]) -> None:
    width = max(24, *(len(subject.name) + 1 for subject in subjects))
    header = (
        f"{'subject':<{width}} {'median ops/s':>13} {'min':>11} {'max':>11} "
        f"{'us/op':>8} {'srv CPU':>8} {'srv us/op':>10} {'cli us/op':>10}"
    )
    print(header)
    print("-" * len(header))
    for subject in subjects:
        rates = [sample.rate for sample in subject.samples]
        rate = median(rates)
        measured = [s for s in subject.samples if s.server_cpu is not None]
        client_per_op = median([s.client_cpu / s.ops * 1e6 for s in subject.samples])
        share = per_op = ""
        if subject.kind != "local" and measured:
            share = f"{median([s.server_cpu / s.seconds for s in measured if s.server_cpu]):.0%}"
            per_op = f"{median([s.server_cpu / s.ops * 1e6 for s in measured if s.server_cpu]):.1f}"
        print(
            f"{subject.name:<{width}} {rate:>13,.0f} {min(rates):>11,.0f} {max(rates):>11,.0f} "
            f"{1e6 / rate:>8.2f} {share:>8} {per_op:>10} {client_per_op:>10.1f}"
        )


def print_ratios(by_name: dict[str, Subject], suffix: str) -> None:
    print(f"{'ratio of medians' + suffix:<{LABEL}} {'value':>6}  aim")
    print("-" * (LABEL + 20))
    for base, denominator, aim in AIMS:
        numerator = base + suffix
        if numerator in by_name and denominator in by_name:
            value = by_name[numerator].median_rate / by_name[denominator].median_rate
            verdict = "PASS" if value >= aim else "MISS"
            print(
                f"{numerator + ' / ' + denominator:<{LABEL}} {value:>6.2f}  >= {aim:g}  {verdict}"
            )
    for base, denominator in CONTEXT:
        numerator = base + suffix
        if numerator in by_name and denominator in by_name:
            value = by_name[numerator].median_rate / by_name[denominator].median_rate
            print(f"{numerator + ' / ' + denominator:<{LABEL}} {value:>6.2f}  (context)")


def server_us_per_op(subject: Subject) -> float:
    return median([s.server_cpu / s.ops * 1e6 for s in subject.samples if s.server_cpu])


def print_audit_overhead(by_name: dict[str, Subject]) -> None:
    """The audit trail to a file against a null sink: same code, same run, same load."""
    pairs = [(by_name.get(n), by_name.get(n + NULL_AUDIT_SUFFIX)) for n in AUDIT_SUBJECTS]
    if not any(null for _, null in pairs):
        return
    print(
        f"{'audit trail (file) vs null sink':<32} {'file/null':>9} {'slowdown':>9} "
        f"{'srv us/op file':>15} {'null':>6} {'+CPU':>7}  aim"
    )
    print("-" * (LABEL + 40))
    for audited, null in pairs:
        if audited is None or null is None:
            continue
        ratio = audited.median_rate / null.median_rate
        slowdown = 1 / ratio - 1  # extra time per request with the trail
        cpu_file, cpu_null = server_us_per_op(audited), server_us_per_op(null)
        verdict = "PASS" if slowdown <= AUDIT_AIM else "MISS"
        print(
            f"{audited.name:<32} {ratio:>9.2f} {slowdown:>+9.1%} {cpu_file:>15.1f} "
            f"{cpu_null:>6.1f} {cpu_file / cpu_null - 1:>+7.1%}  <= {AUDIT_AIM:.0%}  {verdict}"
        )


def report(subjects: list[Subject], args: argparse.Namespace, load: tuple[float, float]) -> None:
    from kms_client import protocol  # noqa: PLC0415

    by_name = {subject.name: subject for subject in subjects}
    backend = getattr(protocol, "_decode", None)
    backend = getattr(backend, "func", backend)  # a functools.partial: name the function
    base64_impl = getattr(backend, "__module__", "") + "." + getattr(backend, "__qualname__", "?")
    rounds = len(subjects[0].samples)
    print()
    print(
        f"machine: {os.cpu_count()} CPUs; Python {sys.version.split()[0]}; "
        f"kmsd source {args.source} at {revision(args.source)}"
        + "".join(f"; candidate {path} at {revision(path)}" for path in args.candidate)
    )
    print(
        f"load average {load[0]:.2f} before, {load[1]:.2f} after (1 min; other work on "
        "the machine shows here and skews every figure)"
    )
    print(
        f"{rounds} rounds x {args.seconds:g} s per subject, interleaved; medians. "
        f"Pipelined: window {args.window} requests, sent {args.chunk} per write. "
        f"protocol base64 decoder: {base64_impl}"
    )
    print(
        "client: Python, raw blocking AF_UNIX socket (sequential: one request per "
        "round trip; pipelined: a sender thread + a reader counting fixed-size replies by bytes)"
    )
    print()
    print_table(subjects)
    print()
    print_ratios(by_name, "")
    if any(name.endswith(NULL_AUDIT_SUFFIX) for name in by_name):
        print()
        print_audit_overhead(by_name)
    for candidate in args.candidate:
        suffix = candidate_suffix(candidate)
        print()
        print_ratios(by_name, suffix)
        print()
        print(f"{'candidate / baseline (same run)':<{LABEL}} {'value':>6}")
        print("-" * (LABEL + 20))
        for subject in subjects:
            if subject.name.endswith(suffix):
                base = by_name[subject.name.removesuffix(suffix)]
                value = subject.median_rate / base.median_rate
                print(f"{subject.name:<{LABEL}} {value:>6.2f}")
    print()
    print(
        "us/op = 1 / median rate. srv CPU = server CPU time / wall time (100% = one core "
        "busy); srv us/op and cli us/op = CPU microseconds per request in the server and in "
        "this client (all threads)."
    )


# --------------------------------------------------------------------------- main


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="~10 s run: 3 rounds of 0.2 s")
    parser.add_argument("--rounds", type=int, default=None, help="rounds per subject (5)")
    parser.add_argument("--seconds", type=float, default=None, help="seconds per sample (0.8)")
    parser.add_argument(
        "--window", type=int, default=256, help="pipelined requests in flight (256)"
    )
    parser.add_argument("--chunk", type=int, default=64, help="pipelined requests per write (64)")
    parser.add_argument(
        "--source",
        type=lambda text: Path(text).resolve(),
        default=ROOT,
        metavar="DIR",
        help="source tree of the baseline kmsd (default: this checkout)",
    )
    parser.add_argument(
        "--candidate",
        type=lambda text: Path(text).resolve(),
        action="append",
        default=[],
        metavar="DIR",
        help="also measure a kmsd run from this source tree (holding kms_server/ and "
        "kms_client/), in the same rounds, and print candidate/baseline ratios (repeatable)",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="measure only subjects whose name contains NAME (repeatable); e.g. hold a "
        "steady load for a profiler: --only 'pipe ENC 64 B' --rounds 1 --seconds 30",
    )
    parser.add_argument(
        "--no-audit-overhead",
        action="store_true",
        help="skip the daemon with a null audit sink (the audit overhead lines)",
    )
    parser.add_argument("--serve-echo", metavar="SOCKET", help=argparse.SUPPRESS)
    parser.add_argument("--echo-reply-size", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rounds is None:
        args.rounds = 3 if args.quick else 5
    if args.seconds is None:
        args.seconds = 0.2 if args.quick else 0.8
    if args.chunk > args.window:
        parser.error("--chunk must not exceed --window")
    if args.serve_echo:
        return args
    for candidate in [args.source, *args.candidate]:
        if not (candidate / "kms_server").is_dir():
            parser.error(f"--candidate {candidate} holds no kms_server/")
    if len({candidate_suffix(c) for c in args.candidate}) < len(args.candidate):
        parser.error("--candidate directories need distinct names")
    return args


def main() -> int:
    if sys.argv[1:2] == [NULL_AUDIT]:
        return serve_kmsd_null_audit(sys.argv[2:])
    args = parse_args()
    if args.serve_echo:
        serve_echo(args.serve_echo, args.echo_reply_size)
        return 0
    sys.path.insert(0, str(args.source))  # the local recipe comes from the baseline tree
    work = Path(tempfile.mkdtemp(prefix="kmsb-", dir="/tmp"))  # short: AF_UNIX path limit
    servers: list[ServerProcess] = []
    try:
        recipe = Recipe.load()
        servers.append(start_echo(work, "echo"))
        servers.append(start_echo(work, "echo-8KiB", recipe.enc_reply_size(recipe.large)))
        daemons = [("", start_kmsd(work / "base", "kmsd", args.source))]
        servers.append(daemons[0][1])
        for number, candidate in enumerate(args.candidate):
            daemon = start_kmsd(
                work / f"c{number}", f"kmsd{candidate_suffix(candidate)}", candidate
            )
            daemons.append((candidate_suffix(candidate), daemon))
            servers.append(daemon)
        null_audit = None
        if not args.no_audit_overhead and (args.source / "kms_server" / "audit.py").exists():
            null_audit = start_kmsd(
                work / "null", "kmsd" + NULL_AUDIT_SUFFIX, args.source, null_audit=True
            )
            servers.append(null_audit)
        print(", ".join(f"{s.name} pid {s.pid}" for s in servers) + f"; work dir {work}")
        echoes = (servers[0], servers[1])
        subjects = build_subjects(recipe, echoes, daemons, args.window, args.chunk, null_audit)
        if args.only:
            subjects = [s for s in subjects if any(part in s.name for part in args.only)]
            if not subjects:
                print("no subject matches --only", file=sys.stderr)
                return 2
        load_before = os.getloadavg()[0]
        for subject in subjects:  # warm-up: caches, branch predictors, trio's deadline heap
            subject.run(min(0.2, args.seconds / 2))
        for round_number in range(args.rounds):
            # Rotate the starting subject each round so none always follows the same other.
            shift = round_number % len(subjects)
            for subject in subjects[shift:] + subjects[:shift]:
                subject.measure(args.seconds)
            print(f"round {round_number + 1}/{args.rounds} done", flush=True)
        report(subjects, args, (load_before, os.getloadavg()[0]))
    finally:
        for server in reversed(servers):
            server.stop()
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
