# Benchmark: user-space instructions per request (valgrind callgrind), kmsd beside its ceilings.
"""Count the instructions one request costs, where timings are too noisy to compare.

On a shared 2-core machine the rates of ``bench_kmsd.py`` move by 10-30% from run
to run; an instruction count does not (two runs of one tree agree to 0.1%). Each
subject runs twice under ``valgrind --tool=callgrind``, with N requests and with
none; the difference over N is the cost of one request, start-up cancelled out:

* ``seq echo``: the trio echo server of ``bench_kmsd.py``, one ``PING`` per round trip;
* ``seq GET``: kmsd, one ``GET`` per round trip (audit trail to a file);
* ``pipe ENC 64 B``: kmsd, ``ENC`` of 64 bytes, 64 requests per write;
* ``local ENC 64 B``: ``KeyVersion.encrypt`` in a loop, in process.

kmsd runs as ``kmsd serve`` through this script, with its batches never cut into
2 ms slices, which under callgrind would come every few requests (see
:func:`serve_kmsd_unsliced`).

It prints the counts and the two ratios that mirror the time aims of
``bench_kmsd.py`` (``seq echo / seq GET`` against 0.8, ``local ENC / pipe ENC``
against 0.5). Only user-space instructions are counted: the kernel's share of a
request (system calls, waking the peer; the audit ``write``) is not, so these
ratios are upper bounds of the time ratios. ``--candidate DIR`` measures another
source tree in the same run. Needs valgrind; takes a few minutes.
"""

from __future__ import annotations

import argparse
import base64
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH_KMSD = ROOT / "benchmarks" / "bench_kmsd.py"
KEY_ID = "bench"
BATCH = 64
START_TIMEOUT = 300.0  # Python start-up under callgrind takes 10-40 s
ENC_LINE = f"ENC {KEY_ID} ".encode() + base64.b64encode(bytes(64)) + b"\n"
LOCAL_LOOP = (
    "import sys\n"
    "from kms_server.keys import KeyVersion\n"
    "key = KeyVersion('bench', 1, '2026-01-01T00:00:00Z', True, bytearray(32))\n"
    "plaintext = bytes(64)\n"
    "for _ in range(int(sys.argv[1])):\n"
    "    key.encrypt(plaintext, b'')\n"
)


def callgrind(command: list[str], out: Path) -> list[str]:
    return [
        "valgrind",
        "--tool=callgrind",
        f"--callgrind-out-file={out}",
        *command,
    ]


def total_instructions(out: Path) -> int:
    match = re.search(r"^(?:summary|totals): (\d+)", out.read_text(), re.MULTILINE)
    if match is None:
        raise RuntimeError(f"no instruction total in {out}")
    return int(match.group(1))


def environment(source: Path) -> dict[str, str]:
    # A fixed hash seed: dict and set layouts, hence instruction counts, repeat exactly.
    return {**os.environ, "PYTHONPATH": str(source), "PYTHONHASHSEED": "0"}


def connect(path: Path) -> socket.socket:
    deadline = time.monotonic() + START_TIMEOUT
    while True:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            conn.connect(str(path))
        except OSError:
            conn.close()
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing answers on {path}") from None
            time.sleep(0.5)
        else:
            return conn


def read_lines(conn: socket.socket, count: int) -> bytes:
    data = b""
    while data.count(b"\n") < count:
        chunk = conn.recv(1 << 20)
        if not chunk:
            raise RuntimeError("the server closed the connection")
        data += chunk
    return data


def sequential(line: bytes) -> Callable[[socket.socket, int], None]:
    def drive(conn: socket.socket, requests: int) -> None:
        for _ in range(requests):
            conn.sendall(line)
            read_lines(conn, 1)

    return drive


def pipelined(line: bytes) -> Callable[[socket.socket, int], None]:
    def drive(conn: socket.socket, requests: int) -> None:
        for _ in range(requests // BATCH):
            conn.sendall(line * BATCH)
            replies = read_lines(conn, BATCH)
            if not replies.startswith(b"OK "):
                raise RuntimeError(f"unexpected reply {replies[:60]!r}")

    return drive


UNSLICED = "--serve-kmsd-unsliced"


def serve_kmsd_unsliced(argv: list[str]) -> int:
    """Run ``kmsd`` (``argv`` as its command line) in this process, batches never sliced.

    A long batch lets other connections run every ``SLICE_NS`` (2 ms). Under
    callgrind, 2 ms is a few requests, so the daemon would yield and write its audit
    lines every few requests of a pipelined batch instead of about once per batch as
    at full speed, which added ~17,000 instructions to each pipelined ``ENC``.
    """
    from kms_server import cli, server  # noqa: PLC0415 - from the measured source tree

    server.SLICE_NS = 1 << 62
    cli.main(argv, prog_name="kmsd")
    return 0


def served(
    source: Path,
    kmsd: bool,
    drive: Callable[[socket.socket, int], None],
    requests: int,
    work: Path,
) -> int:
    """Instructions of a server process that answered ``requests`` driven by ``drive``."""
    run = Path(tempfile.mkdtemp(dir=work))
    run.chmod(0o700)
    sock = run / "s.sock"
    if kmsd:
        kek = run / "kek"
        kek.write_text(os.urandom(32).hex() + "\n")
        kek.chmod(0o600)
        store = run / "store"
        subprocess.run(
            [
                sys.executable,
                "-m",
                "kms_server",
                "init",
                "--store",
                str(store),
                "--kek-file",
                str(kek),
            ],
            cwd=source,
            env=environment(source),
            check=True,
            capture_output=True,
        )
        command = [sys.executable, str(Path(__file__).resolve()), UNSLICED, "serve"]
        command += ["--store", str(store), "--socket", str(sock)]
        command += ["--kek-file", str(kek), "--audit-log", str(run / "audit.log")]
    else:
        command = [sys.executable, str(BENCH_KMSD), "--serve-echo", str(sock)]
    out = run / "callgrind.out"
    with (run / "server.log").open("wb") as log:
        server = subprocess.Popen(
            callgrind(command, out),
            cwd=source,
            env=environment(source),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
        )
    try:
        with connect(sock) as conn:
            if kmsd:
                conn.sendall(f"CREATE {KEY_ID} exportable\n".encode())
                if read_lines(conn, 1) != b"OK 1\n":
                    raise RuntimeError("CREATE failed")
            drive(conn, requests)
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(120)
    return total_instructions(out)


def local(source: Path, requests: int, work: Path) -> int:
    out = Path(tempfile.mkdtemp(dir=work)) / "callgrind.out"
    subprocess.run(
        callgrind([sys.executable, "-c", LOCAL_LOOP, str(requests)], out),
        cwd=source,
        env=environment(source),
        check=True,
        capture_output=True,
    )
    return total_instructions(out)


def per_request(measure: Callable[[int], int], requests: int) -> float:
    return (measure(requests) - measure(0)) / requests


def measure_tree(source: Path, requests: int, work: Path) -> dict[str, float]:
    # Byte-compile first: a run that compiled a changed module would count that too.
    subprocess.run(
        [sys.executable, "-m", "compileall", "-q", "kms_server", "kms_client"],
        cwd=source,
        check=True,
    )
    subjects: dict[str, Callable[[int], int]] = {
        "seq echo": lambda n: served(source, False, sequential(b"PING\n"), n, work),
        "seq GET": lambda n: served(source, True, sequential(f"GET {KEY_ID}\n".encode()), n, work),
        "pipe ENC 64 B": lambda n: served(source, True, pipelined(ENC_LINE), n, work),
        "local ENC 64 B": lambda n: local(source, n, work),
    }
    counts = {}
    for name, measure in subjects.items():
        counts[name] = per_request(measure, requests)
        print(f"  {name:<16} {counts[name]:>10,.0f} instructions per request", flush=True)
    return counts


def main() -> int:
    if sys.argv[1:2] == [UNSLICED]:
        return serve_kmsd_unsliced(sys.argv[2:])
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=2048, help="requests per subject (2048)")
    parser.add_argument("--source", type=Path, default=ROOT, help="kmsd source tree")
    parser.add_argument(
        "--candidate", type=Path, action="append", default=[], help="another tree (repeatable)"
    )
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        print("bench_instructions: needs valgrind (apt-get install -y valgrind)", file=sys.stderr)
        return 2
    requests = max(BATCH, args.requests // BATCH * BATCH)
    results: dict[Path, dict[str, float]] = {}
    with tempfile.TemporaryDirectory(prefix="kmsi-") as work:
        for tree in [args.source, *args.candidate]:
            print(f"{tree}: {requests} requests per subject, under callgrind", flush=True)
            results[tree] = measure_tree(tree.resolve(), requests, Path(work))
    print()
    print(f"{'tree':<32} {'seq echo / seq GET':>19} {'local / pipe ENC 64 B':>22}")
    for tree, counts in results.items():
        sequential_ratio = counts["seq echo"] / counts["seq GET"]
        encrypt_ratio = counts["local ENC 64 B"] / counts["pipe ENC 64 B"]
        print(f"{tree!s:<32} {sequential_ratio:>19.2f} {encrypt_ratio:>22.2f}")
    print("(time aims: >= 0.8 and >= 0.5; user-space instructions only, kernel work excluded)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
