"""Launch the real SGLang server with the adapter: the CPU platform unless a GPU is present."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import requests

CPU_KV_TOKENS = 131072


def has_gpu() -> bool:
    import torch

    return torch.cuda.is_available()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def server_command(model_path: str | Path, port: int, enable_entropy: bool, extra_args=()) -> list[str]:
    cmd = [
        sys.executable,
        "-m",
        "sglang.launch_server",
        "--model-path",
        str(model_path),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    if not has_gpu():
        cmd += ["--device", "cpu", "--attention-backend", "torch_native", "--sampling-backend", "pytorch"]
        if "--max-total-tokens" not in extra_args:
            # On a CPU SGLang sizes the KV pool from the machine's free RAM (10+ GB here), so two
            # servers side by side (tests, bench) would not fit; 128k tokens is ample for them.
            cmd += ["--max-total-tokens", str(CPU_KV_TOKENS)]
    if enable_entropy:
        cmd.append("--enable-entropy")
    return cmd + list(extra_args)


def standalone_args(drafter: str | Path, num_steps: int = 3, drafters=()) -> list[str]:
    """SGLang's STANDALONE speculative flags for chain drafts of ``num_steps`` tokens (what the
    portable CPU platform runs), and ``--entropy-drafters`` when several drafters are routed
    (the first of them must be ``drafter``)."""
    args = [
        "--speculative-algorithm",
        "STANDALONE",
        "--speculative-draft-model-path",
        str(drafter),
        "--speculative-num-steps",
        str(num_steps),
        "--speculative-eagle-topk",
        "1",
        "--speculative-num-draft-tokens",
        str(num_steps + 1),
    ]
    if drafters:
        args += ["--entropy-drafters", ",".join(str(d) for d in drafters)]
    return args


def server_env(extra_env=None, extra_args=()) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("SGLANG_ENTROPY_ENABLE", None)  # the flag decides, not a stray variable
    env.pop("SGLANG_HTTP_SERVER_APP_PATH", None)  # --enable-entropy points it at the adapter's app
    if not has_gpu():
        env["SGLANG_PLATFORM"] = "portable_cpu"
        env.update(cpu_scale_out_env(list(extra_args)))
    env.update(extra_env or {})
    return env


def cpu_scale_out_env(args: list[str]) -> dict[str, str]:
    """What SGLang needs on a CPU for several ranks or tokenizer workers: each DP x TP rank its
    own cores (SGLang otherwise asserts one rank per NUMA node), and tokenizer workers time to
    start on a slow machine (uvicorn kills a worker not up within 10 s)."""

    def value(flag: str) -> int:
        return int(args[args.index(flag) + 1]) if flag in args else 1

    env = {}
    ranks = value("--dp-size") * value("--tp-size")
    if ranks > 1 and "SGLANG_CPU_OMP_THREADS_BIND" not in os.environ:
        cores = os.cpu_count() or ranks
        per_rank = cores // ranks
        if per_rank <= 1:  # one core per rank, shared round-robin when there are more ranks than cores
            binds = [str(r % cores) for r in range(ranks)]
        else:
            binds = [f"{r * per_rank}-{(r + 1) * per_rank - 1}" for r in range(ranks)]
        env["SGLANG_CPU_OMP_THREADS_BIND"] = "|".join(binds)
    if value("--tokenizer-worker-num") > 1:
        env.setdefault("SGLANG_UVICORN_WORKER_HEALTHCHECK_TIMEOUT", "180")
    return env


class Server:
    def __init__(self, process: subprocess.Popen, url: str, log_path: Path):
        self.process, self.url, self.log_path = process, url, log_path

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def server_url(url: str | None, model_path, extra_args=(), progress=None):
    """Yield ``url`` when a server is already running there; otherwise launch one with the
    adapter enabled for as long as the block runs and yield its URL (benchmarks take either)."""
    if url:
        yield url
        return
    with launch(model_path, enable_entropy=True, extra_args=extra_args, progress=progress) as server:
        yield server.url


@contextmanager
def launch(model_path, enable_entropy=True, extra_args=(), extra_env=None, timeout=600, progress=None):
    """Start the server, wait until it generates, yield a ``Server``, stop it."""

    def command(port: int) -> list[str]:
        return server_command(model_path, port, enable_entropy, extra_args)

    with _running(command, server_env(extra_env, extra_args), "server", timeout, progress) as server:
        yield server


PORT_ATTEMPTS = 3


class PortTaken(RuntimeError):
    """The free port picked for a server was bound by another process before the server bound it."""


@contextmanager
def _running(command, env, name: str, timeout: float, progress):
    """Run ``command(port)`` on a free port in its own process group, logging to a file, until
    it generates; yield it as a ``Server`` and stop it afterwards. A port is only known free when
    it is picked, so a server that finds it taken is started again on another."""
    for attempt in range(PORT_ATTEMPTS):
        port = free_port()
        log = tempfile.NamedTemporaryFile(prefix=f"sglang-entropy-{name}-", suffix=".log", delete=False)
        process = subprocess.Popen(command(port), env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        server = Server(process, f"http://127.0.0.1:{port}", Path(log.name))
        try:
            _wait_ready(server, timeout, progress)
        except BaseException as e:
            _stop(process)
            log.close()
            if isinstance(e, PortTaken) and attempt + 1 < PORT_ATTEMPTS:
                continue
            raise
        try:
            yield server
        finally:
            _stop(process)
            log.close()
        return


def _wait_ready(server: Server, timeout: float, progress) -> None:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if server.process.poll() is not None:
            tail = server.log_tail()
            error = PortTaken if "address already in use" in tail.lower() else RuntimeError
            raise error(f"the SGLang server exited with {server.process.returncode}:\n{tail}")
        try:
            if requests.get(f"{server.url}/health_generate", timeout=30).status_code == 200:
                return
        except requests.RequestException:
            pass
        if progress:
            progress(time.monotonic() - start)
        time.sleep(1)
    raise TimeoutError(f"the SGLang server did not answer within {timeout} s:\n{server.log_tail()}")


def _stop(process: subprocess.Popen) -> None:
    import signal

    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


ROUTING_KEY_HEADER = "x-smg-routing-key"  # sglang-router's manual policy sends equal keys to one server


def router_command(worker_urls: list[str], port: int, metrics_port: int) -> list[str]:
    """sglang-router in front of ``worker_urls``, with affinity by routing key (its manual
    policy): the requests of one group carry the group's name in ``ROUTING_KEY_HEADER``."""
    return [
        sys.executable,
        "-m",
        "sglang_router.launch_router",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--policy",
        "manual",
        "--prometheus-port",  # its default port is fixed: a second router on the machine would fail
        str(metrics_port),
        "--worker-urls",
        *worker_urls,
    ]


@contextmanager
def router(worker_urls: list[str], timeout=300):
    """Start sglang-router in front of running servers, wait until it generates, yield a
    ``Server`` for it, stop it."""
    metrics_port = free_port()

    def command(port: int) -> list[str]:
        return router_command(worker_urls, port, metrics_port)

    with _running(command, None, "router", timeout, None) as server:
        yield server
