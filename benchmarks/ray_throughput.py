"""Images/s of ``hiseg predict`` on the local engine and on Ray Data (1 and 2 actors), same run.

Every engine segments the same photos (the val split of Pascal-Person-Part, read in place) with
the same model and writes the same outputs (label map + overlay) to a fresh folder; the Ray
cluster is started once before the timed runs (its start is reported apart). The markdown table
ends with what 10 million photos would take from the measured throughput per core.

    .venv/bin/python benchmarks/ray_throughput.py --data ../shared/data/pascal-person-part
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import onnxruntime
import ray

from hiseg.bench import cpu_name
from hiseg.distributed import predict_on_ray
from hiseg.predictor import load
from hiseg.runner import Saver, Source, run

PHOTOS = 10_000_000


def val_photos(root: Path) -> list[Path]:
    ids = (root / "val_id.txt").read_text().split()
    return [root / "JPEGImages" / f"{i}.jpg" for i in ids]


def time_local(photos: list[Path], model: str, out: Path) -> float:
    start = time.perf_counter()
    report = run(
        load(model, threads=os.cpu_count()), [Source("image", p) for p in photos], Saver(out)
    )
    assert not report.failed, report.failed[:3]
    return time.perf_counter() - start


def time_ray(listing: Path, model: str, out: Path, workers: int) -> float:
    start = time.perf_counter()
    job = predict_on_ray([str(listing)], Saver(out), {"model": model}, workers=workers)
    assert not job.report.failed and len(job.report.summaries) == job.inputs, job.report.failed
    return time.perf_counter() - start


def machine() -> str:
    load1, load5, _ = os.getloadavg()
    return (
        f"{cpu_name()}, Python {platform.python_version()}, "
        f"onnxruntime {onnxruntime.__version__}, ray {ray.__version__}; load average before the "
        f"run {load1:.1f} (1 min) / {load5:.1f} (5 min)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=Path("../shared/data/pascal-person-part"))
    parser.add_argument("--model", default="pascal-person-part")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/ray_throughput.md"))
    parser.add_argument("--note", default="", help="Conditions to state under the table.")
    args = parser.parse_args()
    photos = val_photos(args.data)
    described = machine()
    cores = os.cpu_count() or 1
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        listing = Path(tmp) / "val.txt"
        listing.write_text("\n".join(str(p.resolve()) for p in photos) + "\n")
        start = time.perf_counter()
        ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False)
        started = time.perf_counter() - start
        runs = [
            ("local", "1 process", None),
            ("ray", "1 actor", 1),
            ("ray", f"{cores} actors", cores),
        ]
        for engine, layout, workers in runs:
            out = Path(tmp) / f"{engine}-{workers}"
            if engine == "local":
                seconds = time_local(photos, args.model, out)
                threads = cores
            else:
                seconds = time_ray(listing, args.model, out, workers)
                threads = cores // workers
            rows.append((engine, layout, threads, seconds, len(photos) / seconds))
            print(rows[-1], file=sys.stderr)
        ray.shutdown()
    ray_rate = rows[-1][-1]  # Ray, one single-thread actor per core: how a large job runs
    per_core = ray_rate / cores
    core_hours = PHOTOS / per_core / 3600
    lines = [
        "# Batch prediction: local engine vs Ray Data",
        "",
        f"Command: `.venv/bin/python benchmarks/ray_throughput.py --data {args.data}`",
        "",
        f"Machine: {described}; {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        f"{len(photos)} val photos of Pascal-Person-Part (read in place), model `{args.model}` "
        "at its own input size, label map + overlay written per photo. Each row is one pass "
        f"over all photos, in this order, in one process; the local Ray cluster ({cores} CPUs) "
        f"was started before them in {started:.1f} s (not counted). Ray rows include starting "
        "the actors and loading the model in each.",
        "",
        "| engine | layout | ONNX threads each | seconds | images/s |",
        "|---|---|---:|---:|---:|",
        *[f"| {e} | {lay} | {t} | {s:.1f} | {r:.2f} |" for e, lay, t, s, r in rows],
        "",
        *([args.note, ""] if args.note else []),
        "## 10 million photos, on paper",
        "",
        f"Ray, one single-thread actor per core, its start included: {ray_rate:.2f} images/s on "
        f"{cores} cores = {per_core:.2f} images/s per core, so {PHOTOS:,} photos take "
        f"{core_hours:,.0f} core-hours. Assuming "
        "the rate per core holds on machines of 32 cores (one single-thread actor per core, "
        "photos and outputs on storage that keeps up; no GPU):",
        "",
        "| machines (32 cores) | wall time |",
        "|---:|---:|",
    ]
    for n in (1, 10, 50, 100):
        hours = PHOTOS / (per_core * 32 * n) / 3600
        lines.append(f"| {n} | {hours:,.1f} h |")
    lines += [
        "",
        "Cost = core-hours x the price of a core-hour on the chosen machines (e.g. at $0.04 per "
        f"core-hour, {core_hours * 0.04:,.0f} USD), the same for any N: more "
        "machines shorten the wall time, not the bill. Each machine also loads the model once "
        "per actor (seconds), which is noise at this scale.",
        "",
    ]
    args.out.write_text("\n".join(lines))
    print(f"saved {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
