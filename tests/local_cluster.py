"""Real services on 127.0.0.1 for the end-to-end tests: a `ray start --head` cluster with token
authentication and an `mlflow server`, each on free ports, each stopped exactly (its own process
tree, never `ray stop`, which would kill every Ray instance on the machine)."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.train_start import LEAN_ENV  # Ray Train's fixed costs that test nothing of ours

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent  # the venv's `ray`, `mlflow`, `python`
# An idle Ray node costs ~9% of one core (its dashboard agent's reports, metrics exports, the
# workers prestarted for a first driver); ~5.5% with these (psutil over 40 s, session 14). The
# suite keeps 2-6 nodes alive at once on 2 cores. Nothing tested reads Ray's own metrics.
QUIET_RAY_ENV = {
    "RAY_prestart_worker_first_driver": "0",
    "REPORTER_UPDATE_INTERVAL_MS": "60000",
    "METRICS_RECORD_INTERVAL_S": "60",
    "RAY_metrics_report_interval_ms": "60000",
}
# What the end-to-end tests train: a shallow HRNet-PSM, one exchange module per stage instead of
# 1, 4, 3 (a train step in half the time, session 20): the runs check the pipeline, test_hrnet the
# model at full depth
SHALLOW = "model.stage_modules=[1,1,1]"


def wait_until(predicate, timeout: float, what: str, cluster=None, job: str = "") -> None:
    """Polls `predicate`; with a cluster and a job, fails at once when the job has ended, and a
    failure shows what the job and its trials were doing."""
    deadline = time.monotonic() + timeout
    while not predicate():
        ended = bool(job) and cluster.job(job)["status"] in ("SUCCEEDED", "FAILED", "STOPPED")
        if ended or time.monotonic() > deadline:
            why = "the job ended" if ended else f"timed out after {timeout:.0f} s"
            state = cluster.diagnose(job) if job else ""
            raise AssertionError(f"{why} waiting for {what}\n{state}")
        time.sleep(0.5)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def port_outside_the_ephemeral_range() -> int:
    """A free port that no `bind(("", 0))` can be given (below the kernel's ephemeral range, above
    Ray's worker ports 10002-19999): for a server stopped and restarted on the same port, which
    another process's port-0 bind could otherwise take while it is away."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    if low <= 20_000:  # no such range on this machine
        return free_port()
    rng = secrets.SystemRandom()
    for _ in range(100):
        port = rng.randrange(20_000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError(f"no free port in 20000-{low}")


def _processes() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, command line), read from /proc."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        out[int(entry.name)] = (ppid, cmd)
    return out


def kill_tree(
    marks: list[str], grace: float = 5.0, signals=(signal.SIGTERM, signal.SIGKILL)
) -> int:
    """SIGTERM, then SIGKILL, every process whose command line holds one of `marks`, with all
    its descendants. Returns how many were signalled."""
    procs = _processes()
    roots = {pid for pid, (_, cmd) in procs.items() if any(m in cmd for m in marks)}
    roots.discard(os.getpid())
    tree, grew = set(roots), True
    while grew:
        children = {pid for pid, (ppid, _) in procs.items() if ppid in tree} - tree
        tree |= children
        grew = bool(children)
    for sig in signals:
        for pid in tree:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and any(Path(f"/proc/{p}").exists() for p in tree):
            time.sleep(0.2)
    return len(tree)


@dataclass
class RayCluster:
    """A head node started with `ray start`; `env` is what a user's shell has after
    `export RAY_AUTH_MODE=token` with the cluster's token file."""

    workdir: Path
    cpus: int = 2
    extra_env: dict[str, str] = field(default_factory=dict)  # what every job and worker gets
    env: dict[str, str] = field(default_factory=dict)
    address: str = ""
    gcs_port: int = 0
    node_dirs: list[str] = field(default_factory=list)
    node_ports: list[int] = field(default_factory=list)  # the `add_node` ids
    # {idle_timeout_minutes, node_types} for Ray's fake multi-node provider: the head's autoscaler
    # starts and removes worker nodes (raylets on this machine) as a cloud provider would
    autoscaling: dict | None = None

    def start(self) -> RayCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        token = self.workdir / "auth_token"
        token.write_text(secrets.token_hex(32))
        token.chmod(0o600)
        # short: Ray's unix sockets live under it, and a socket path has at most 107 bytes
        self.temp_dir = Path(tempfile.mkdtemp(prefix="psmray-", dir="/tmp"))
        self.env = {
            **os.environ,
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN_PATH": str(token),
            **LEAN_ENV,  # as every Ray of the tests
            **QUIET_RAY_ENV,
            **self.extra_env,
        }
        for key in ("RAY_ADDRESS", "MLFLOW_TRACKING_URI"):
            self.env.pop(key, None)
        if self.autoscaling is not None:
            self.env |= {
                "RAY_FAKE_CLUSTER": "1",
                "AUTOSCALER_UPDATE_INTERVAL_S": "1",
                # the provider's nodes on 127.0.0.1, not on the machine's address
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
            }
        # a port picked free may be taken before Ray binds it (the other test process starts
        # its services at the same moment): then again, with other ports
        for _ in range(3):
            done = self._ray_start()
            if done.returncode == 0:
                break
            kill_tree([str(self.temp_dir)])  # what the failed start left running
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = Path(tempfile.mkdtemp(prefix="psmray-", dir="/tmp"))
        else:
            raise RuntimeError(
                f"ray start failed 3 times: {done.stdout[-2000:]}{done.stderr[-2000:]}"
            )
        self._wait_for_job_agent()
        return self

    def _ray_start(self) -> subprocess.CompletedProcess:
        self.gcs_port, dashboard = free_port(), free_port()
        self.address = f"http://127.0.0.1:{dashboard}"
        # this cluster's State API for its own processes (Ray Train's PlacementGroupCleaner),
        # whatever other Ray runs on the machine (tests/conftest.py: ray_local); and never the
        # session Ray's, which would take over `ray job --address`
        self.env["RAY_API_SERVER_ADDRESS"] = self.address
        ports = {
            "--port": self.gcs_port,
            "--dashboard-port": dashboard,
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
            "--ray-client-server-port": free_port(),
        }
        autoscaling = []
        if self.autoscaling is not None:
            autoscaling = [f"--autoscaling-config={self._write_autoscaling_config()}"]
        cmd = [
            str(BIN / "ray"),
            "start",
            "--head",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={self.cpus}",
            "--dashboard-host=127.0.0.1",
            f"--temp-dir={self.temp_dir}",
            "--disable-usage-stats",
            *(f"{k}={v}" for k, v in ports.items()),
            *autoscaling,
        ]
        return subprocess.run(
            cmd, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=120
        )

    def _write_autoscaling_config(self) -> Path:
        """The fake provider's cluster config: `autoscaling`'s worker types beside a head of
        type `ray.head.default` (the name the provider gives its head: another name makes the
        autoscaler launch and remove "head" nodes in a loop), no commands, no file mounts."""
        config = {
            "cluster_name": "psm-fake",
            "max_workers": sum(t["max_workers"] for t in self.autoscaling["node_types"].values()),
            "idle_timeout_minutes": self.autoscaling["idle_timeout_minutes"],
            "upscaling_speed": 1.0,
            "provider": {
                "type": "fake_multinode",
                "gcs_address": f"127.0.0.1:{self.gcs_port}",
                "use_node_id_as_ip": True,
                "disable_node_updaters": True,
                "disable_launch_config_check": True,
            },
            "available_node_types": {
                "ray.head.default": {"resources": {"CPU": self.cpus}, "node_config": {}},
                **{
                    name: {"node_config": {}, "min_workers": 0, **t}
                    for name, t in self.autoscaling["node_types"].items()
                },
            },
            "head_node_type": "ray.head.default",
            "auth": {},
            "file_mounts": {},
            "cluster_synced_files": [],
            "file_mounts_sync_continuously": False,
            **{
                k: []
                for k in (
                    "initialization_commands",
                    "setup_commands",
                    "head_setup_commands",
                    "worker_setup_commands",
                    "head_start_ray_commands",
                    "worker_start_ray_commands",
                )
            },
        }
        path = self.workdir / "autoscaling.yaml"
        path.write_text(json.dumps(config, indent=1))  # JSON is YAML
        return path

    def worker_nodes(self) -> list[float]:
        """The CPUs of every alive worker node (the head left out), from the State API."""
        nodes = self._api("/api/v0/nodes?limit=100&detail=true")["data"]["result"]["result"]
        alive = [n for n in nodes if n["state"] == "ALIVE" and not n["is_head_node"]]
        return sorted(n["resources_total"].get("CPU", 0.0) for n in alive)

    def _wait_for_job_agent(self, timeout: float = 90) -> None:
        # right after `ray start` the job agent may not be up: "No available agent to submit job"
        deadline = time.monotonic() + timeout
        while True:
            try:
                self._api("/api/jobs/")
                return
            except OSError as e:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"Ray job server at {self.address} not ready: {e}") from e
            time.sleep(0.5)

    def _api(self, path: str):
        """GET on the job server's REST API with the cluster's token: what `ray job status` asks,
        without a `ray` process (~2 s of CPU each) per question."""
        token = Path(self.env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        request = urllib.request.Request(
            self.address + path, headers={"Authorization": f"Bearer {token}"}
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def ray(self, *args: str, env: dict | None = None, check: bool = True, timeout: float = 600):
        """The `ray` CLI against this cluster (`--address` added to job subcommands)."""
        argv = [str(BIN / "ray"), *args]
        if args[0] == "job":
            argv[3:3] = ["--address", self.address]
        return subprocess.run(
            argv,
            env=env or self.env,
            cwd=REPO,
            check=check,
            capture_output=True,
            text=True,
            timeout=timeout,
        )

    def submit(
        self,
        *entrypoint: str,
        options: tuple[str, ...] = (),
        wait: bool = True,
        timeout=600,
        working_dir: bool = True,
    ) -> subprocess.CompletedProcess:
        """`ray job submit --working-dir . [OPTIONS] -- ENTRYPOINT`, waiting for the job to end
        unless `wait` is False; without `working_dir`, the code is the nodes' installed copy."""
        flags = [*options, *([] if wait else ["--no-wait"])]
        return self.ray(
            "job",
            "submit",
            *(["--working-dir", "."] if working_dir else []),
            *flags,
            "--",
            *entrypoint,
            check=False,
            timeout=timeout,
        )

    @staticmethod
    def job_id(result: subprocess.CompletedProcess) -> str:
        words = (result.stdout + result.stderr).replace("'", " ").split()
        return next(w for w in words if w.startswith("raysubmit_"))

    def job(self, job_id: str) -> dict:
        """The job's details: status (PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED), driver_info
        (its pid once the entrypoint has connected to Ray), ..."""
        return self._api(f"/api/jobs/{job_id}")

    def logs(self, job_id: str) -> str:
        """What `ray job logs` prints, from the REST API."""
        return self._api(f"/api/jobs/{job_id}/logs")["logs"]

    def diagnose(self, job_id: str, chars: int = 3000) -> str:
        """What a failed wait on a job shows: its status, its log's tail, and the tails of the
        cluster's Train controller and Tune trial logs (a trial stuck in start-up says so there)."""
        lines = [f"job {job_id}: {self.job(job_id)['status']}", self.logs(job_id)[-chars:]]
        logs = sorted(self.temp_dir.glob("session_latest/logs/*"), key=lambda f: f.stat().st_mtime)
        wanted = ("controller", "worker-", "python-core-driver")
        for log in [f for f in logs if any(w in f.name for w in wanted)][-4:]:
            text = log.read_text(errors="replace")[-chars // 3 :]
            lines.append(f"--- {log.name} (tail)\n{text}")
        return "\n".join(lines)

    def wait(self, job_id: str, timeout: float = 600) -> str:
        """The job's final status (SUCCEEDED, FAILED, STOPPED)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            status = self.job(job_id)["status"]
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                return status
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} still running after {timeout} s")

    def add_node(self, cpus: float) -> int:
        """Another node (a raylet of its own) joined to this head; returns its id for
        `remove_node`: its node manager port."""
        port = free_port()
        # a disk of its own, as a machine has: nodes sharing one runtime_resources folder delete
        # each other's copy of a job's working dir
        temp_dir = tempfile.mkdtemp(prefix="psmnode-", dir="/tmp")
        self.node_dirs.append(temp_dir)
        ports = {
            "--node-manager-port": port,
            "--object-manager-port": free_port(),
            "--dashboard-agent-listen-port": free_port(),
            "--dashboard-agent-grpc-port": free_port(),
            "--runtime-env-agent-port": free_port(),
            "--metrics-export-port": free_port(),
        }
        cmd = [
            str(BIN / "ray"),
            "start",
            f"--address=127.0.0.1:{self.gcs_port}",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus}",
            f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
            *(f"{k}={v}" for k, v in ports.items()),
        ]
        r = subprocess.run(cmd, env=self.env, cwd=REPO, capture_output=True, text=True, timeout=120)
        if r.returncode:
            raise RuntimeError(f"ray start (node): {r.stdout[-2000:]}{r.stderr[-2000:]}")
        self.node_ports.append(port)
        return port

    def remove_node(self, node: int) -> int:
        """Kill a node as a lost machine dies: its raylet and every process under it."""
        return kill_tree([f"--node_manager_port={node} "], signals=(signal.SIGKILL,))

    def node_of(self, process_name: str) -> int | None:
        """The node (`add_node` id) of this cluster running a Ray process with `process_name` in
        its title (other Ray instances on the machine may run one too)."""
        procs = _processes()
        for pid, (_, cmd) in procs.items():
            if not cmd.startswith("ray::") or process_name not in cmd:
                continue
            ancestor = procs[pid][0]
            while ancestor in procs:
                found = re.search(r"--node_manager_port=(\d+)", procs[ancestor][1])
                if found and int(found.group(1)) in self.node_ports:
                    return int(found.group(1))
                ancestor = procs[ancestor][0]
        return None

    def stop(self) -> None:
        kill_tree([str(self.temp_dir), f":{self.gcs_port} ", *self.node_dirs])
        for folder in (self.temp_dir, *self.node_dirs):
            shutil.rmtree(folder, ignore_errors=True)


@dataclass
class MlflowServer:
    """`mlflow server` with a sqlite backend and proxied artifacts in `workdir`."""

    workdir: Path
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> MlflowServer:  # its start took > 90 s at load 30
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = self.port or port_outside_the_ephemeral_range()  # `outage` frees it
        cmd = [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--backend-store-uri",
            f"sqlite:///{self.workdir / 'mlflow.db'}",
            "--artifacts-destination",
            str(self.workdir / "artifacts"),
            "--workers",
            "1",
        ]
        log = open(self.workdir / "server.log", "ab")  # noqa: SIM115 - the server holds it
        # no job-execution workers (a huey consumer and its processes, ~2 GB): no test uses
        # MLflow's server-side jobs
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                # MLflow's own answer: another server on a reused port (Ray's metrics endpoint
                # answers every path with 200) must not pass for it
                with urllib.request.urlopen(f"{self.uri}/health", timeout=2) as r:
                    if r.status == 200 and r.read().strip() == b"OK":
                        return self
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start; see {self.workdir}/server.log")
            time.sleep(0.5)

    @contextlib.contextmanager
    def outage(self) -> Iterator[None]:
        """The server away (stopped: connections refused) and back on the same port and store.
        The port is out of the range port-0 binds are given and held meanwhile by a bound socket
        that does not listen: an ephemeral one, freed, was taken by another test process's Ray
        for its metrics endpoint, which answers every path, and the jobs' MLflow calls went
        there (CI, session 12)."""
        self.stop()
        holder = socket.socket()
        holder.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        holder.bind(("127.0.0.1", self.port))  # OSError: taken in the moment it was free
        try:
            yield
        finally:
            holder.close()
            self.start()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # uvicorn, its job runner and huey
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()


@dataclass
class S3Server:
    """moto's S3 server: `env` points boto3 and pyarrow's s3:// at it (AWS_ENDPOINT_URL)."""

    workdir: Path
    secret: str = "psm-e2e-secret-" + secrets.token_hex(8)  # found nowhere it is logged
    port: int = 0
    process: subprocess.Popen | None = None

    @property
    def env(self) -> dict[str, str]:
        return {
            "AWS_ENDPOINT_URL": f"http://127.0.0.1:{self.port}",
            "AWS_ACCESS_KEY_ID": "psm-e2e",
            "AWS_SECRET_ACCESS_KEY": self.secret,
            "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_REGION": "us-east-1",
        }

    def start(self, bucket: str, timeout: float = 60) -> S3Server:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        log = open(self.workdir / "moto.log", "ab")  # noqa: SIM115 - the server holds it
        self.process = subprocess.Popen(
            [str(BIN / "moto_server"), "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                break
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"moto_server: no start; {self.workdir}/moto.log") from None
                time.sleep(0.3)
        self.client().create_bucket(Bucket=bucket)
        return self

    @contextlib.contextmanager
    def in_environ(self):
        """This process's boto3 and pyarrow (and the processes it starts) pointed at the server
        while the block runs; the environment as it was afterwards."""
        saved = {k: os.environ.get(k) for k in self.env}
        os.environ.update(self.env)
        try:
            yield self
        finally:
            for key, value in saved.items():
                if value is None:
                    os.environ.pop(key, None)
                else:
                    os.environ[key] = value

    def upload(self, folder: Path, bucket: str, prefix: str) -> None:
        """Every file under `folder` as `prefix/RELATIVE/PATH` (a COCO root as data.root=s3://)."""
        client = self.client()
        for path in folder.rglob("*"):
            if path.is_file():
                key = f"{prefix}/{path.relative_to(folder)}"
                client.put_object(Bucket=bucket, Key=key, Body=path.read_bytes())

    def client(self):
        import boto3

        e = self.env
        return boto3.client(
            "s3",
            endpoint_url=e["AWS_ENDPOINT_URL"],
            region_name="us-east-1",
            aws_access_key_id=e["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=e["AWS_SECRET_ACCESS_KEY"],
        )

    def keys(self, bucket: str, prefix: str) -> list[str]:
        pages = (
            self.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
        )
        return [o["Key"] for page in pages for o in page.get("Contents", [])]

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=20)
