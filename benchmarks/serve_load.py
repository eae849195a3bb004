"""Load on ``hiseg serve``: concurrent clients on 127.0.0.1 for a bounded time, then a run of
1,000 requests watching the server's memory, then ``hiseg predict`` on the same photos.

Each client keeps one connection and posts the bundled photos in turn (JSON answer, every level:
the full work of a request); a 503 is followed by waiting its Retry-After. Reports throughput,
p50/p99 latency of the answered requests, answers by status (only 200 and 503 are acceptable),
and the server's RSS (VmRSS) before, during (max) and after.

    .venv/bin/python benchmarks/serve_load.py --clients 1,4,16 --duration 25 \
        --memory-requests 1000 --out benchmarks/serve_load.md
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np

from hiseg.bench import cpu_name

ROOT = Path(__file__).resolve().parents[1]
PHOTOS = [ROOT / "examples" / "astronaut.jpg", ROOT / "examples" / "group.jpg"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


class Server:
    """``hiseg serve`` in a subprocess, with its RSS sampled in a thread."""

    def __init__(self, model: str, extra: list[str]):
        self.port = free_port()
        command = [sys.executable, "-m", "hiseg", "serve", "--port", str(self.port)]
        command += ["--model", model, *extra]
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 60
        while not self._healthy():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"hiseg serve did not start: {self.process.stderr.read()}")
            time.sleep(0.2)
        self.peak = 0.0
        self._stop = threading.Event()
        threading.Thread(target=self._sample, daemon=True).start()

    def _healthy(self) -> bool:
        try:
            connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
            connection.request("GET", "/healthz")
            return connection.getresponse().status == 200
        except OSError:
            return False

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            self.peak = max(self.peak, self.rss())

    def rss(self) -> float:
        return rss_mb(self.process.pid)

    def reset_peak(self) -> None:
        self.peak = self.rss()

    def stop(self) -> None:
        self._stop.set()
        self.process.terminate()
        self.process.wait(30)


def client(port: int, photos: list[bytes], until, log: list, lock: threading.Lock) -> None:
    """Posts photos until ``until()`` says stop; logs (status, seconds, end time) per request."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
    i = 0
    while not until():
        body = photos[i % len(photos)]
        i += 1
        start = time.perf_counter()
        try:
            connection.request("POST", "/v1/segment?levels=all", body=body)
            response = connection.getresponse()
            response.read()
            status, retry = response.status, response.getheader("Retry-After")
        except (OSError, http.client.HTTPException):
            status, retry = "connection error", None
            connection.close()
            connection = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        end = time.perf_counter()
        with lock:
            log.append((status, end - start, end))
        if status == 503:
            time.sleep(float(retry or 1))


def load(port: int, photos: list[bytes], clients: int, until) -> tuple[list, float]:
    log: list = []
    lock = threading.Lock()
    start = time.perf_counter()
    threads = [
        threading.Thread(target=client, args=(port, photos, until, log, lock))
        for _ in range(clients)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return log, time.perf_counter() - start


def summarize(log: list, seconds: float) -> dict:
    ok = [s for status, s, _ in log if status == 200]
    statuses = Counter(str(status) for status, _, _ in log)
    return {
        "requests": len(log),
        "ok": len(ok),
        "per_s": len(ok) / seconds,
        "p50_ms": float(np.percentile(ok, 50) * 1000) if ok else float("nan"),
        "p99_ms": float(np.percentile(ok, 99) * 1000) if ok else float("nan"),
        "statuses": dict(statuses),
        "seconds": seconds,
    }


def predict_cli(model: str, copies: int) -> dict:
    """``hiseg predict`` on the same photos (``copies`` of each), wall time of the command."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "in"
        folder.mkdir()
        for photo in PHOTOS:
            for k in range(copies):
                shutil.copy(photo, folder / f"{photo.stem}_{k}{photo.suffix}")
        n = len(PHOTOS) * copies
        command = [sys.executable, "-m", "hiseg", "predict", str(folder), "-m", model]
        command += ["-o", str(Path(tmp) / "out")]
        start = time.perf_counter()
        subprocess.run(command, check=True, capture_output=True)
        seconds = time.perf_counter() - start
    return {"images": n, "seconds": seconds, "per_s": n / seconds}


def machine() -> str:
    load1, load5, _ = os.getloadavg()
    return f"{cpu_name()}, load average {load1:.1f} / {load5:.1f} at start"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="pascal-person-part")
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--duration", type=float, default=25.0, help="Seconds per client count.")
    parser.add_argument("--memory-requests", type=int, default=1000)
    parser.add_argument("--memory-clients", type=int, default=4)
    parser.add_argument("--predict-copies", type=int, default=25)
    parser.add_argument("--serve-args", default="", help="Extra `hiseg serve` options.")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "serve_load.md")
    args = parser.parse_args()

    photos = [p.read_bytes() for p in PHOTOS]
    where = machine()
    server = Server(args.model, args.serve_args.split())
    rows = []
    try:
        load(server.port, photos, 1, iter([False] * 4 + [True]).__next__)  # warm-up
        rss_start = server.rss()
        for clients in (int(c) for c in args.clients.split(",")):
            server.reset_peak()
            before = server.rss()
            end = time.monotonic() + args.duration
            log, seconds = load(server.port, photos, clients, lambda e=end: time.monotonic() > e)
            row = summarize(log, seconds)
            row.update(clients=clients, rss_before=before, rss_peak=server.peak)
            row["rss_after"] = server.rss()
            rows.append(row)
            print(json.dumps(row), flush=True)
        # Memory over many requests: RSS after each tenth of them.
        done = [0]
        lock = threading.Lock()
        marks: list[tuple[int, float]] = [(0, server.rss())]
        step = max(1, args.memory_requests // 10)

        def until() -> bool:
            with lock:
                done[0] += 1
                if done[0] % step == 0 and done[0] <= args.memory_requests:
                    marks.append((done[0], server.rss()))
                return done[0] > args.memory_requests

        server.reset_peak()
        log, seconds = load(server.port, photos, args.memory_clients, until)
        memory = summarize(log, seconds)
        memory.update(marks=marks, rss_peak=server.peak, rss_after=server.rss())
        print(json.dumps(memory), flush=True)
    finally:
        server.stop()
    predicted = predict_cli(args.model, args.predict_copies)
    print(json.dumps(predicted), flush=True)
    write(args, where, rows, memory, rss_start, predicted)


def write(args, where: str, rows: list, memory: dict, rss_start: float, predicted: dict) -> None:
    command = " ".join(["benchmarks/serve_load.py", *sys.argv[1:]])
    extra = args.serve_args.split()
    lines = [
        f"# hiseg serve under load ({args.model})",
        "",
        f"Command: `.venv/bin/python {command}`",
        "",
        f"Machine: {where}. Server: `{' '.join(['hiseg serve --model', args.model, *extra])}`"
        " (defaults: one worker per two cores, queue 8). Each client posts the bundled photos "
        "(astronaut 512x512, group 640x400) in turn on one keep-alive connection, JSON with "
        "every level; after a 503 it waits its Retry-After.",
        "",
        "| clients | s | answered/s | p50 ms | p99 ms | answers by status | RSS before MB "
        "| RSS peak MB | RSS after MB |",
        "|---:|---:|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        statuses = ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items()))
        lines.append(
            f"| {r['clients']} | {r['seconds']:.0f} | {r['per_s']:.2f} | {r['p50_ms']:.0f} "
            f"| {r['p99_ms']:.0f} | {statuses} | {r['rss_before']:.0f} | {r['rss_peak']:.0f} "
            f"| {r['rss_after']:.0f} |"
        )
    marks = ", ".join(f"{n}: {mb:.0f}" for n, mb in memory["marks"])
    statuses = ", ".join(f"{k}: {v}" for k, v in sorted(memory["statuses"].items()))
    lines += [
        "",
        f"Memory over {memory['requests']} more requests ({args.memory_clients} clients, "
        f"{memory['per_s']:.2f}/s, p50 {memory['p50_ms']:.0f} ms, p99 {memory['p99_ms']:.0f} ms, "
        f"{statuses}): RSS in MB after n requests: {marks}; peak {memory['rss_peak']:.0f}, "
        f"after {memory['rss_after']:.0f}. RSS after warm-up was {rss_start:.0f} MB.",
        "",
        f"Same photos through `hiseg predict` in the same run: {predicted['images']} images in "
        f"{predicted['seconds']:.1f} s = {predicted['per_s']:.2f} images/s (wall time of the "
        "command: start-up, model load and writing the outputs included).",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
