"""Requests/s of `fanaoi serve-model` on localhost: one client, then 4 concurrent clients.

The service runs in its own process (`fanaoi serve-model`, uvicorn, one worker) over a
registry whose champion is the demo-sized model (params.yaml `model`), built as in
bench/export_throughput.py or copied from --registry (never changed). Each request
uploads one validation image (PNG) to POST /predict. The baseline is the same work without
HTTP: flows.serve_model.check_upload + classify on the same bytes, one after another, in this
process.

    python bench/serve_throughput.py [--registry DIR --data DIR] [--requests 400]
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.export_throughput import add_champion_arguments, champion_for_bench  # noqa: E402
from flows.params import write_params  # noqa: E402
from tasks.data.dataset import list_images, select  # noqa: E402
from tasks.params import Params  # noqa: E402

CLIENTS = 4
STARTUP_SECONDS = 120


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_service(params: Params, root: Path, port: int) -> subprocess.Popen:
    params_file = write_params(params, root / "params.yaml")
    service = subprocess.Popen(
        [sys.executable, "-m", "flows.cli", "--params", str(params_file), "serve-model",
         "--port", str(port)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + STARTUP_SECONDS
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return service
        except httpx.TransportError:
            time.sleep(0.2)
    service.kill()
    raise SystemExit(f"the service did not answer on port {port} within {STARTUP_SECONDS} s")


def validation_uploads(params: Params, limit: int = 200) -> list[bytes]:
    """The bytes of up to ``limit`` validation images: the request bodies both serve benchmarks send."""
    validation = select(list_images(params.data.dir, params.data), "validation")
    return [image.path.read_bytes() for image in validation[:limit]]


def run_client(url: str, images: list[bytes], count: int) -> list[float]:
    """Seconds per request of ``count`` uploads over one keep-alive connection."""
    seconds = []
    with httpx.Client(timeout=60) as client:
        for index in range(count):
            started = time.perf_counter()
            answer = client.post(url, files={"file": ("fan.png", images[index % len(images)], "image/png")})
            answer.raise_for_status()
            seconds.append(time.perf_counter() - started)
    return seconds


def report(name: str, requests: int, wall: float, latencies: list[float], baseline: float) -> float:
    rate = requests / wall
    cuts = statistics.quantiles(latencies, n=20)
    print(f"{name:26}{rate:>10.1f}{rate / baseline:>10.2f}{cuts[9] * 1000:>10.1f}{cuts[18] * 1000:>10.1f}")
    return rate


def direct_rate(params: Params, images: list[bytes], count: int) -> float:
    """Images/s of the service's own work, without HTTP, in this process."""
    from flows.serve_model import ChampionHolder, check_upload, classify

    loaded = ChampionHolder(params.registry.dir).current()
    for data in images[:5]:
        classify(loaded, data)
    started = time.perf_counter()
    for index in range(count):
        data = images[index % len(images)]
        check_upload(data, params.serve, params.validate)
        classify(loaded, data)
    return count / (time.perf_counter() - started)


@contextlib.contextmanager
def served_champion(
    description: str, requests: int, prefix: str
) -> Iterator[tuple[argparse.Namespace, Params, list[bytes], str, subprocess.Popen]]:
    """The serve benchmarks' set-up: arguments, a champion in a temporary project, its
    validation uploads, and `fanaoi serve-model` answering at the yielded /predict URL."""
    parser = argparse.ArgumentParser(description=description)
    add_champion_arguments(parser)
    parser.add_argument("--requests", type=int, default=requests, help="requests per measurement")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        root = Path(tmp)
        params = champion_for_bench(root, args)
        images = validation_uploads(params)
        port = free_port()
        service = start_service(params, root, port)
        try:
            yield args, params, images, f"http://127.0.0.1:{port}/predict", service
        finally:
            service.terminate()
            service.wait(timeout=30)


def main() -> None:
    with served_champion(__doc__.splitlines()[0], 400, "fanaoi-bench-serve-") as (args, params, images, url, _):
        print(f"{len(images)} validation images, {statistics.mean(map(len, images)) / 1024:.1f} KB "
              f"average PNG; {args.requests} requests per measurement")
        baseline = direct_rate(params, images, args.requests)
        run_client(url, images, 20)  # warm-up: connections, thread pool
        print(f"\n{'':26}{'req/s':>10}{'vs direct':>10}{'p50 ms':>10}{'p95 ms':>10}")
        print(f"{'direct (no HTTP)':26}{baseline:>10.1f}{1:>10.2f}")
        started = time.perf_counter()
        latencies = run_client(url, images, args.requests)
        sequential = report("HTTP, 1 client", args.requests, time.perf_counter() - started,
                            latencies, baseline)
        share = args.requests // CLIENTS
        started = time.perf_counter()
        with ThreadPoolExecutor(CLIENTS) as pool:
            runs = list(pool.map(lambda _: run_client(url, images, share), range(CLIENTS)))
        concurrent = report(f"HTTP, {CLIENTS} clients", share * CLIENTS, time.perf_counter() - started,
                            [s for run in runs for s in run], baseline)
        print(f"\n{CLIENTS} concurrent clients / 1 client: {concurrent / sequential:.2f}")


if __name__ == "__main__":
    main()
