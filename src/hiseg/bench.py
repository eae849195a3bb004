"""Speed on this CPU: the network forward per runtime and precision, and what a user waits for.

Every row is timed in turns with the others (one call of each per round), so an A/B comparison
on a shared machine is fair. Each size is the long side of a 4:3 portrait image, letterboxed as
the runtime does, so the network input is (1, 3, size, round(size * 3/4) padded up to a
multiple of 32): 320 -> 1x3x320x256, 512 -> 1x3x512x384. ``predict`` rows time
:meth:`Predictor.predict` on a whole photo (resize, normalise, run, upsample the probabilities,
decode the tree), the latency a user feels.

torch is imported only to time a ``.ckpt`` (through the predictor's torch backend), so the
benchmark runs on a runtime-only install.
"""

from __future__ import annotations

import importlib.util
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from functools import partial
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np

from hiseg.files import publish
from hiseg.pipeline import prepare
from hiseg.predictor import Backend, Predictor, bundled_models, load_backend, resolve_model
from hiseg.spec import ModelError

INT8_SUFFIX = ".int8.onnx"
#: Height and width of the stand-in photo for ``predict`` rows: a portrait PASCAL VOC photo,
#: so its network input is the ``forward`` row's.
PHOTO_HW = (500, 375)
COLUMNS = {
    "model": "model",
    "runtime": "runtime",
    "precision": "precision",
    "task": "task",
    "input": "input",
    "threads": "threads",
    "median_ms": "median ms",
    "p90_ms": "p90 ms",
    "images_per_s": "images/s",
}


def int8_path(fp32: str | Path) -> Path:
    """Where an fp32 model's int8 variant lives: ``model.onnx`` -> ``model.int8.onnx``."""
    return Path(fp32).with_suffix(INT8_SUFFIX)


def model_variants(model: str | Path) -> list[Path]:
    """``model`` and the existing files worth comparing with it: ``x.ckpt`` -> x.ckpt, x.onnx,
    x.int8.onnx; ``x.onnx`` -> x.onnx, x.int8.onnx. A bundled model's name is its file."""
    path = Path(model)
    if not path.exists() and str(model) in bundled_models():
        return [resolve_model(model)]
    candidates = [path, path.with_suffix(".onnx"), int8_path(path)]
    return list(dict.fromkeys(p for p in candidates if p.is_file()))


def benchmark(
    model: str | Path | Sequence[str | Path],
    sizes: Sequence[int] | None = None,
    threads: int = 2,
    runs: int = 30,
    warmup: int = 5,
    image: np.ndarray | None = None,
) -> list[dict[str, Any]]:
    """One row per model variant and size: latency median and p90 (ms) and images/s at batch 1.

    ``model`` is a file or several; each brings its siblings (:func:`model_variants`). A
    ``.ckpt`` is timed in torch fp32 when torch is installed, every ``.onnx`` in ONNX Runtime
    (precision from its metadata), and each ``.onnx`` also end to end on ``image``
    (default: a random photo of ``PHOTO_HW``). ``sizes``: the long sides to time each model at
    (default: each model's own, its :attr:`ModelSpec.long_side`, as ``predict`` runs it).
    """
    models = [model] if isinstance(model, (str, Path)) else model
    paths = list(dict.fromkeys(p for m in models for p in model_variants(m)))
    given = ", ".join(str(m) for m in models)
    if not paths:
        known = ", ".join(bundled_models())
        raise ModelError(
            f"{given}: no such model file (nor its .onnx / .int8.onnx sibling) and no bundled "
            f"model of that name ({known})"
        )
    if importlib.util.find_spec("torch") is None:
        paths = [p for p in paths if p.suffix != ".ckpt"]
        if not paths:  # an empty table would look like a benchmark that ran
            raise ModelError(f"{given}: timing a .ckpt needs torch: pip install 'hiseg[train]'")
    rng = np.random.default_rng(0)
    photo = image if image is not None else rng.integers(0, 256, (*PHOTO_HW, 3), np.uint8)
    jobs: list[tuple[dict[str, Any], Callable[[], object]]] = []
    names = [path.name for path in paths]
    for path in paths:
        checkpoint = path.suffix == ".ckpt"
        backend = load_backend(path, "torch" if checkpoint else "onnx", threads)
        row = {
            # two runs' model.onnx are told apart by their folder
            "model": path.name
            if names.count(path.name) == 1
            else f"{path.parent.name}/{path.name}",
            "runtime": "torch" if checkpoint else "onnxruntime",
            "precision": backend.spec.precision,
            "threads": threads,
        }
        for size in sizes or (backend.spec.long_side,):
            x = _random_input(rng, size, backend)
            shape = "x".join(map(str, x.shape))
            jobs.append(({**row, "task": "forward", "input": shape}, partial(backend.run, x)))
            if not checkpoint:
                predictor = Predictor([backend], long_side=size)
                fitted = prepare(photo, backend.spec, size)[0].shape
                shape = "x".join(map(str, photo.shape)) + f" photo -> 1x3x{fitted[1]}x{fitted[2]}"
                jobs.append(
                    ({**row, "task": "predict", "input": shape}, partial(predictor.predict, photo))
                )
    times = time_interleaved([fn for _, fn in jobs], runs, warmup)
    return [{**row, **_stats(t)} for (row, _), t in zip(jobs, times, strict=True)]


def write_markdown(rows: Sequence[dict[str, Any]], path: str | Path, command: str) -> Path:
    """A Markdown table of ``rows`` headed by the command and the machine that produced it."""
    path = Path(path)
    versions = [f"onnxruntime {version('onnxruntime')}"]
    if "torch" in sys.modules:  # only report torch when it was used
        versions.append(f"torch {sys.modules['torch'].__version__}")
    lines = [
        "# hiseg benchmark",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {cpu_name()}, {platform.python_implementation()} "
        f"{platform.python_version()}, {', '.join(versions)}; "
        f"{datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC.",
        "",
        "Batch 1. `forward`: the network alone on the input shown. `predict`: "
        "`Predictor.predict` on a whole photo (resize, normalise, run, upsample, decode). "
        "The rows are timed in turns, one call of each per round.",
        "",
        "| " + " | ".join(COLUMNS.values()) + " |",
        "|"
        + "|".join("---:" if k.endswith(("_ms", "_s", "threads")) else "---" for k in COLUMNS)
        + "|",
    ]
    for row in rows:
        cells = [f"{row[k]:.1f}" if isinstance(row[k], float) else str(row[k]) for k in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    path.parent.mkdir(parents=True, exist_ok=True)
    publish(path, lambda tmp: tmp.write_text("\n".join(lines) + "\n"))
    return path


def _random_input(rng: np.random.Generator, size: int, backend: Backend) -> np.ndarray:
    """The network input of a random 4:3 portrait image of long side ``size``, as the runtime
    prepares it."""
    image = rng.integers(0, 256, (size, round(size * 3 / 4), 3), np.uint8)
    return prepare(image, backend.spec, size)[0][None]


def time_interleaved(
    fns: Sequence[Callable[[], object]], runs: int, warmup: int
) -> list[list[float]]:
    """Milliseconds per call of each of ``fns``, taken in turns (one call of each per round), so
    a load that comes and goes on a shared machine weighs on all of them alike."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(runs):
        for fn, out in zip(fns, times, strict=True):
            start = time.perf_counter()
            fn()
            out.append((time.perf_counter() - start) * 1000)
    return times


def _stats(times_ms: Sequence[float]) -> dict[str, float]:
    return {
        "median_ms": statistics.median(times_ms),
        "p90_ms": float(np.percentile(times_ms, 90)),
        "images_per_s": 1000 * len(times_ms) / sum(times_ms),
    }


def cpu_name() -> str:
    """The CPU model (Linux) or what the platform reports, and the core count."""
    name = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    return f"{name} ({os.cpu_count()} logical cores)"
