"""`fanaoi serve-model` under load: requests/s and latency at 1, 4 and 32 clients, and the
service's peak memory under 32 concurrent uploads of a 7000x7000 PNG.

The service runs in its own process (as in bench/serve_throughput.py) with the params'
serve limits (serve.max_concurrency requests at once, 503 beyond). Each client uploads
validation images over one keep-alive connection; a 503 is counted, not retried. The
hostile part sends, from 32 clients at once, a small PNG announcing a 7000x7000 canvas,
the probe of issue 15 that once took the service to 4.6 GB. Targets: the service's peak
RSS stays under 1.5 GB, and no answer is 5xx other than 503 at the cap.

    python bench/serve_load.py [--registry DIR --data DIR] [--requests 200]
"""

from __future__ import annotations

import io
import statistics
import sys
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.serve_throughput import served_champion  # noqa: E402

CLIENT_COUNTS = (1, 4, 32)
HOSTILE_CLIENTS = 32
RSS_TARGET_BYTES = 1.5e9


def run_client(url: str, images: list[bytes], count: int) -> list[tuple[int, float]]:
    """(status, seconds) of ``count`` uploads over one keep-alive connection."""
    answers = []
    with httpx.Client(timeout=120) as client:
        for index in range(count):
            started = time.perf_counter()
            answer = client.post(url, files={"file": ("fan.png", images[index % len(images)], "image/png")})
            answers.append((answer.status_code, time.perf_counter() - started))
    return answers


def load(url: str, images: list[bytes], clients: int, requests: int) -> tuple[float, list[tuple[int, float]]]:
    """Wall seconds and every (status, seconds) of ``requests`` shared by ``clients``."""
    share = max(1, requests // clients)
    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(lambda _: run_client(url, images, share), range(clients)))
    return time.perf_counter() - started, [answer for run in runs for answer in run]


def peak_rss(pid: int) -> int:
    """The process's high-water resident memory (Linux /proc VmHWM), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise SystemExit("VmHWM not in /proc: this benchmark needs Linux")


def huge_canvas_png() -> bytes:
    """A few KB of PNG that decodes to 7000x7000 pixels (49 M, under validate.max_pixels)."""
    buffer = io.BytesIO()
    Image.new("L", (7000, 7000), 40).save(buffer, format="PNG", optimize=True)
    return buffer.getvalue()


def describe(answers: list[tuple[int, float]]) -> str:
    return ", ".join(f"{status}: {n}" for status, n in sorted(Counter(s for s, _ in answers).items()))


def main() -> None:
    description = __doc__.splitlines()[0]
    with served_champion(description, 200, "fanaoi-bench-serve-load-") as (args, params, images, url, service):
        bad: list[int] = []
        run_client(url, images, 10)  # warm-up
        print(f"serve.max_concurrency = {params.serve.max_concurrency}; {args.requests} requests "
              f"per row\n\n{'clients':>8}{'ok req/s':>10}{'p50 ms':>9}{'p95 ms':>9}  answers")
        for clients in CLIENT_COUNTS:
            wall, answers = load(url, images, clients, args.requests)
            ok = [seconds for status, seconds in answers if status == 200]
            cuts = statistics.quantiles(ok, n=20) if len(ok) > 1 else [float("nan")] * 19
            print(f"{clients:>8}{len(ok) / wall:>10.1f}{cuts[9] * 1000:>9.1f}"
                  f"{cuts[18] * 1000:>9.1f}  {describe(answers)}")
            bad += [s for s, _ in answers if s >= 500 and s != 503]
        canvas = huge_canvas_png()
        before = peak_rss(service.pid)
        _, answers = load(url, [canvas], HOSTILE_CLIENTS, HOSTILE_CLIENTS * 4)
        bad += [s for s, _ in answers if s >= 500 and s != 503]
        after = peak_rss(service.pid)
        print(f"\n{HOSTILE_CLIENTS} clients x 4 uploads of a {len(canvas) / 1024:.0f} KB PNG of "
              f"7000x7000: {describe(answers)}")
        print(f"service peak RSS: {before / 1e6:.0f} MB before, {after / 1e6:.0f} MB after "
              f"(target < {RSS_TARGET_BYTES / 1e9:.1f} GB): {'OK' if after < RSS_TARGET_BYTES else 'OVER'}")
        print(f"5xx other than 503: {len(bad)}")


if __name__ == "__main__":
    main()
