"""CPU time `Predictor.predict` spends beside the network, robust to a loaded machine.

    python benchmarks/predict_overhead.py [--src OTHER_CHECKOUT/src]

`hiseg bench` times wall clock, which a shared machine (a niced training, other jobs) inflates
at random; this times only the calling thread's CPU (`time.thread_time`, min over runs) with the
network replaced by its stored output, so two versions of the pipeline (the code here and, with
`--src`, another checkout's) can be compared on the same photos: the `hiseg bench` stand-in (a
random 500x375 photo) and real ones (examples/, and Pascal-Person-Part val when present).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
PASCAL_VAL = HERE.parent.parent / "shared" / "data" / "pascal-person-part"


def measure(runs: int) -> None:
    """Prints one line per model and size: the bench photo's CPU ms and the real photos' mean."""
    import numpy as np

    from hiseg.data import open_dataset
    from hiseg.images import as_rgb
    from hiseg.pipeline import prepare
    from hiseg.predictor import load

    photos = [np.random.default_rng(0).integers(0, 256, (500, 375, 3), np.uint8)]
    paths = sorted((HERE.parent / "examples").glob("*.jpg"))
    if PASCAL_VAL.is_dir():
        paths += [s.image_path for s in open_dataset(PASCAL_VAL, "val").samples[:5]]
    photos += [as_rgb(path)[0] for path in paths]
    for model in ("person", "pascal-person-part"):
        for size in (320, 512):
            predictor = load(model, threads=2, long_side=size)
            backend = predictor.backends[0]
            network = backend.run
            best = []
            for photo in photos:
                output = network(prepare(photo, backend.spec, size)[0][None])
                fresh: list = []  # a new copy per call, made off the clock: softmax works in place
                backend.run = lambda x, fresh=fresh: fresh.pop()
                times = []
                for _ in range(runs):
                    fresh.append(output.copy())
                    start = time.thread_time()
                    predictor.predict(photo)
                    times.append(time.thread_time() - start)
                best.append(1000 * min(times))
            print(
                f"{model} {size}: bench photo {best[0]:.2f} ms, "
                f"{len(best) - 1} real photos {np.mean(best[1:]):.2f} ms"
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--src", type=Path, help="Also time this checkout's src/ (e.g. older).")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        measure(args.runs)
        return
    for src in [None, args.src] if args.src else [None]:
        print(f"-- {src or 'this checkout'}", flush=True)
        env_path = {"PYTHONPATH": str(src)} if src else {}
        command = [sys.executable, __file__, "--measure", "--runs", str(args.runs)]
        subprocess.run(command, check=True, env={**os.environ, **env_path})


if __name__ == "__main__":
    main()
