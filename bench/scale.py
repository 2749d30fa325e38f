"""Every stage at 10,000, 30,000 (and, with --with-100k, 100,000) images: seconds and peak RSS.

For each size, in a throwaway git + DVC project (the real dvc.yaml and params.yaml, one
training epoch, a local DVC remote) holding a demo set drawn once per size and seed:

1. ``dvc add data``, ``dvc status``, ``dvc push``: the first snapshot;
2. ``fanaoi validate`` cold (empty manifest and near-duplicate caches);
3. ``fanaoi ingest`` of 1,000 new images (judge, copy, ``dvc add``, ``dvc push``);
4. 1 % more images copied in, ``fanaoi validate`` warm, ``fanaoi snapshot`` of them, then
   ``fanaoi snapshot`` again with nothing changed (the stamp shortcut) and ``dvc status``;
5. the leak check: the index against brute force on up to 3,000 held-out images (agreement
   and time; brute force over all of them extrapolated);
6. ``fanaoi train`` (one epoch), ``fanaoi evaluate``, ``fanaoi gate`` (no champion yet), then
   ``fanaoi gate --no-publish`` twice against the champion it published;
7. ``dvc commit`` of the four stages, a Prefect server started, one settling ``fanaoi retrain``, then the
   no-change night ``--runs`` times (median) against that server.

Every command runs in its own process, as cron or a person starts it; peak RSS is the
largest resident set of that process or the children it waited for (``wait4``), and CPU
seconds (user + system, the process and its children) sit beside wall seconds: on a
shared machine wall time grows with the other jobs' load, CPU time much less. Results
go to ``--results`` (JSON, merged across runs), so sizes measured in separate runs end up
in one table with the growth factor from the smallest size to the largest.

    python bench/scale.py [--sizes 10000 30000] [--with-100k] [--work DIR] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import numpy as np
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tasks.data.demo_set import generate_demo_dataset  # noqa: E402
from tests.dvc_support import BIN, PROJECT, make_pipeline_repo, run, tool_env  # noqa: E402

TARGETS_100K = {  # stage -> seconds, from the scale issue
    "nightly, no change": 10.0,
    "validate, warm (1 % new)": 30.0,
    "validate, cold": 300.0,
    "ingest 1,000": 60.0,
}
RSS_TARGET_MB = 6000.0
BRUTE_FORCE_QUERIES = 3000


def draw_set(work: Path, count: int, size: int, seed: int) -> Path:
    """A demo set drawn once per (count, size, seed) and kept under ``work/sets``."""
    folder = work / "sets" / f"demo-{count}-{size}px-seed{seed}"
    if not (folder / ".complete").is_file():
        shutil.rmtree(folder, ignore_errors=True)
        started = time.perf_counter()
        generate_demo_dataset(folder, count, seed, size, 0.5)
        (folder / ".complete").write_text("", encoding="utf-8")
        print(f"  drew {count} images of {size} px in {time.perf_counter() - started:.0f} s", flush=True)
    return folder


def copy_renamed(source: Path, target: Path, prefix: str) -> int:
    """The images of a drawn set into a data set's class folders, under new names."""
    copied = 0
    for image in sorted(source.glob("*/*.png")):
        (target / image.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(image, target / image.parent.name / f"{prefix}{image.name}")
        copied += 1
    return copied


def measure(name: str, command: list[str], cwd: Path, env: dict[str, str],
            results: dict[str, dict]) -> subprocess.CompletedProcess | None:
    """Run one command in its own process; record wall seconds and peak RSS under ``name``."""
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    output = process.stdout.read() if process.stdout else ""
    _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - started
    cpu = usage.ru_utime + usage.ru_stime
    results[name] = {"seconds": round(seconds, 2), "cpu": round(cpu, 2),
                     "rss_mb": round(usage.ru_maxrss / 1024, 1), "exit": process.returncode}
    print(f"  {name:<34} {seconds:8.1f} s wall {cpu:8.1f} s CPU {usage.ru_maxrss / 1024:7.0f} MB  "
          f"exit {process.returncode}", flush=True)
    if process.returncode not in (0, 2):  # ingest exits 2 when it rejected files
        print(output[-3000:])
        return None
    return subprocess.CompletedProcess(command, process.returncode, output, "")


def make_project(root: Path, data: Path, epochs: int) -> Path:
    project = make_pipeline_repo(root / "project", root / "remote")
    params = yaml.safe_load((PROJECT / "params.yaml").read_text(encoding="utf-8"))
    params["train"]["epochs"] = epochs
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False), encoding="utf-8")
    shutil.copytree(data, project / "data", ignore=shutil.ignore_patterns(".complete"))
    run(project, "git", "commit", "--quiet", "-am", "repository params, one epoch")
    return project


def leak_check(project: Path, results: dict[str, dict]) -> None:
    """The index and brute force on the warm manifest: same answers, and their times."""
    from flows.params import load_params
    from tasks.data.manifest import build_manifest
    from tasks.data.near_duplicates import hash_matrix, within_radius

    params = load_params(project / "params.yaml")
    manifest = build_manifest(project / "data", params.data, params.validate,
                              project / params.validate.cache_dir)
    usable = manifest[manifest["decodable"].fillna(False).astype(bool)]
    train = hash_matrix(list(usable.loc[usable["split"] == "train", "dhash"]))
    held = hash_matrix(list(usable.loc[usable["split"] != "train", "dhash"]))
    radius = params.validate.near_duplicate_distance
    started = time.perf_counter()
    distance, nearest = within_radius(held, train, radius)
    index_seconds = time.perf_counter() - started
    sample = held[:BRUTE_FORCE_QUERIES]
    started = time.perf_counter()
    closest = np.empty(len(sample), dtype=np.int64)
    bits = np.empty(len(sample), dtype=np.int64)
    for start in range(0, len(sample), 64):
        block = np.bitwise_count(sample[start:start + 64, None] ^ train[None, :]).sum(axis=2, dtype=np.int64)
        closest[start:start + 64] = block.argmin(axis=1)
        bits[start:start + 64] = block.min(axis=1)
    brute_seconds = (time.perf_counter() - started) * len(held) / max(len(sample), 1)
    close = bits <= radius
    agree = bool((distance[:len(sample)] == np.where(close, bits, -1)).all()
                 and (nearest[:len(sample)] == np.where(close, closest, -1)).all())
    results["leak index (in process)"] = {"seconds": round(index_seconds, 3)}
    results["leak brute force (extrapolated)"] = {"seconds": round(brute_seconds, 2)}
    results["leak check"] = {"agree": agree, "compared": len(sample), "held_out": len(held),
                             "train": len(train), "leaks": int((distance >= 0).sum())}
    print(f"  leak index {index_seconds:.3f} s vs brute force {brute_seconds:.1f} s "
          f"(extrapolated from {len(sample)} of {len(held)} held-out images); agree with brute force: "
          f"{agree}; {int((distance >= 0).sum())} held-out image(s) within {radius} bits", flush=True)


def start_prefect_server(work: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    log = (work / "prefect-server.log").open("w", encoding="utf-8")
    server = subprocess.Popen(
        [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
        env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}/api"
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2):
                return server, url
        except OSError:
            time.sleep(1)
    server.terminate()
    raise SystemExit(f"prefect server did not answer on {url} within 180 s; see {log.name}")


def bench_size(work: Path, count: int, size: int, seed: int, runs: int) -> dict[str, dict]:
    print(f"\n{count:,} images ({size} px demo fans, seed {seed})", flush=True)
    results: dict[str, dict] = {}
    data = draw_set(work, count, size, seed)
    extra = draw_set(work, max(count // 100, 2), size, seed + 1)
    batch = draw_set(work, 1000, size, seed + 2)
    root = work / f"run-{count}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    project = make_project(root, data, epochs=1)
    env = {name: value for name, value in tool_env().items() if not name.startswith("PREFECT_")}
    env |= {"PREFECT_HOME": str(root / "prefect-home"), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    fanaoi = [str(BIN / "fanaoi"), "--params", str(project / "params.yaml")]
    dvc = str(BIN / "dvc")

    steps = [
        ("dvc add, first", [dvc, "add", "--quiet", "data"]),
        ("dvc status", [dvc, "status"]),
        ("dvc push, first", [dvc, "push", "--quiet"]),
        ("validate, cold", [*fanaoi, "validate"]),
        ("ingest 1,000", [*fanaoi, "ingest", str(batch), "--quiet"]),
    ]
    for name, command in steps:
        if measure(name, command, project, env, results) is None:
            return results
    copy_renamed(extra, project / "data", "more_")
    steps = [
        ("validate, warm (1 % new)", [*fanaoi, "validate"]),
        ("snapshot of the 1 %", [*fanaoi, "snapshot"]),
        ("snapshot, no change", [*fanaoi, "snapshot"]),
        ("dvc status, warm", [dvc, "status"]),
    ]
    for name, command in steps:
        if measure(name, command, project, env, results) is None:
            return results
    leak_check(project, results)
    for stage in ("train", "evaluate", "gate"):
        name = "train, 1 epoch" if stage == "train" else stage
        if measure(name, [*fanaoi, stage], project, env, results) is None:
            return results
    # The gate above published the first champion. Against it, the first gate scores the
    # champion and the second may reuse those scores: neither model changed.
    for name in ("gate vs champion, 1st", "gate vs champion, 2nd"):
        if measure(name, [*fanaoi, "gate", "--no-publish"], project, env, results) is None:
            return results
    train_report = json.loads((project / "reports" / "train.json").read_text(encoding="utf-8"))
    results["train, 1 epoch"]["images_per_second"] = train_report["images_per_second"]

    run(project, dvc, "commit", "--force", "--quiet", "validate", "train", "evaluate", "gate")
    server, url = start_prefect_server(root, env)
    try:
        env["PREFECT_API_URL"] = url
        measure("nightly, settling run", [*fanaoi, "retrain"], project, env, results)
        nights = {}
        for index in range(runs):
            done = measure(f"nightly, no change #{index + 1}", [*fanaoi, "retrain"], project, env, nights)
            if done is None or "decision: UNCHANGED" not in done.stdout:
                print("  a night with nothing changed did work:\n" + (done.stdout[-2000:] if done else ""))
        seconds = [night["seconds"] for night in nights.values()]
        results["nightly, no change"] = {
            "seconds": statistics.median(seconds), "all": seconds,
            "cpu": statistics.median(night["cpu"] for night in nights.values()),
            "rss_mb": max(night["rss_mb"] for night in nights.values()),
        }
    finally:
        server.terminate()
        server.wait(timeout=60)
    return results


def print_table(all_results: dict[str, dict]) -> None:
    sizes = sorted(all_results, key=int)
    stages = [stage for stage in next(iter(all_results.values())) if "seconds" in all_results[sizes[0]][stage]]
    header = "| stage | " + " | ".join(f"{int(s):,}: wall s / CPU s / MB" for s in sizes)
    growth = len(sizes) > 1
    if growth:
        header += f" | growth {int(sizes[0]) // 1000}k->{int(sizes[-1]) // 1000}k (CPU, else wall)"
    if "100000" in all_results:
        header += " | target at 100k"
    print("\n" + header + " |")
    print("|" + "---|" * (header.count("|")))
    for stage in stages:
        cells = []
        for size in sizes:
            entry = all_results[size].get(stage, {})
            cpu = f" / {entry['cpu']:.1f}" if "cpu" in entry else " / -"
            rss = f" / {entry['rss_mb']:,.0f}" if "rss_mb" in entry else ""
            digits = 1 if entry.get("seconds", 0) >= 1 else 3
            cells.append(f"{entry['seconds']:.{digits}f}{cpu}{rss}" if "seconds" in entry else "-")
        row = f"| {stage} | " + " | ".join(cells)
        if growth:
            ends = [all_results[s].get(stage, {}) for s in (sizes[0], sizes[-1])]
            key = "cpu" if all("cpu" in end for end in ends) else "seconds"
            first, last = (end.get(key) for end in ends)
            row += f" | {last / first:.1f}x" if first and last else " | -"
        if "100000" in all_results:
            target = TARGETS_100K.get(stage)
            row += f" | <= {target:.0f} s" if target else " | "
        print(row + " |")
    for size in sizes:
        check = all_results[size].get("leak check")
        if check:
            print(f"{int(size):,}: leak index agrees with brute force on {check['compared']} of "
                  f"{check['held_out']} held-out images: {check['agree']}; {check['leaks']} within radius")
        peak = max((e.get("rss_mb", 0) for e in all_results[size].values()), default=0)
        print(f"{int(size):,}: peak RSS of any stage {peak:,.0f} MB (target {RSS_TARGET_MB:,.0f} MB)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 30_000])
    parser.add_argument("--with-100k", action="store_true", help="add 100,000 images (15 min on 2 cores)")
    parser.add_argument("--image-size", type=int, default=64, help="side of the demo images, px")
    parser.add_argument("--seed", type=int, default=20261125)
    parser.add_argument("--runs", type=int, default=3, help="no-change nights (median)")
    parser.add_argument("--work", type=Path, help="keeps the drawn sets and projects (default: temp)")
    parser.add_argument("--results", type=Path, help="JSON results, merged by size (default: WORK/results.json)")
    parser.add_argument("--table", action="store_true", help="print the table of --results and stop")
    args = parser.parse_args()
    work = args.work or Path(tempfile.mkdtemp(prefix="fanaoi-scale-"))
    results_path = args.results or work / "results.json"
    stored = json.loads(results_path.read_text(encoding="utf-8")) if results_path.is_file() else {}
    if not args.table:
        sizes = args.sizes + ([100_000] if args.with_100k else [])
        print(f"work folder {work}; {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}")
        for count in sizes:
            stored[str(count)] = bench_size(work, count, args.image_size, args.seed, args.runs)
            stored[str(count)]["load average"] = {"value": os.getloadavg()[0]}
            results_path.parent.mkdir(parents=True, exist_ok=True)
            results_path.write_text(json.dumps(stored, indent=2) + "\n", encoding="utf-8")
    if stored:
        print_table(stored)
    if not args.work:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    main()
