"""Training throughput (images/s) of each config on this CPU, through the real `hiseg train` path.

    python benchmarks/train_throughput.py [CONFIG ...] [--threads 2] [--steps 30] [--warmup 5]
        [--set "KEY=VALUE [KEY=VALUE ...]" ...] [--base KEY=VALUE ...] [--rounds 1] [--out FILE]

Runs Lightning's fit loop (data loading, augmentation, bf16 autocast, channels_last, optimiser) for
warmup + steps batches with validation off, times the steps after the warmup, and writes
benchmarks/train_throughput.md.

Each ``--set`` is one variant of every config (its overrides on top of ``--base``), timed beside
the baseline (``--base`` alone) in ``--rounds`` interleaved rounds, each round in another order.
The table gives each variant's median images/s and the median of its per-round ratio to the
baseline: with other work on the machine, ratios from one run are what to compare, not rates.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import lightning as L
import torch

from hiseg.config import load_config
from hiseg.models import preprocessing
from hiseg.training import SegmentationTask, build_loaders

HERE = Path(__file__).resolve().parent


class StepTimer(L.Callback):
    def __init__(self, warmup: int):
        self.warmup, self.begin, self.start, self.images = warmup, 0.0, 0.0, 0

    def on_train_start(self, trainer, pl_module) -> None:
        self.begin = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == self.warmup:
            self.start = time.perf_counter()
        elif batch_idx + 1 > self.warmup:
            self.images += len(batch[0])

    def rate(self) -> float:
        return self.images / (time.perf_counter() - self.start)


def measure(config_path: Path, overrides: list[str], threads: int, steps: int, warmup: int) -> dict:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        config = load_config(config_path, [f"out_dir={out}", "tracking.mlflow=false", *overrides])
        norm = preprocessing(config.model.encoder)
        setup = time.perf_counter()
        train_loader, _, train_data = build_loaders(config, norm["mean"], norm["std"])
        task = SegmentationTask(config, train_data.tree.to_dict())
        setup = time.perf_counter() - setup
        timer = StepTimer(warmup)
        t = config.trainer
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            precision=t.precision,  # type: ignore[arg-type]  # Lightning checks the name
            max_epochs=1,
            limit_train_batches=warmup + steps,
            limit_val_batches=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[timer],
        )
        trainer.fit(task, train_loader)
    d, m = config.data, config.model
    return {
        "config": config_path.name,
        "arch": m.arch,
        "encoder": m.encoder,
        "crop": d.crop_size,
        "batch": d.batch_size,
        "workers": d.num_workers,
        "precision": t.precision,
        "images_per_s": timer.rate(),
        "setup_s": setup,
        "warmup_s": timer.start - timer.begin,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--base", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--set", dest="variants", action="append", default=[], metavar="OVERRIDES")
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--out", type=Path, default=HERE / "train_throughput.md")
    args = parser.parse_args()
    configs = args.configs or sorted((HERE.parent / "configs").glob("*.yaml"))
    variants = ["", *args.variants]
    rates: dict[tuple[int, int], list[float]] = {}
    ratios: dict[tuple[int, int], list[float]] = {}
    rows: dict[tuple[int, int], dict] = {}
    for rnd in range(args.rounds):
        for c, config in enumerate(configs):
            order = variants[rnd % len(variants) :] + variants[: rnd % len(variants)]
            got = {}
            for variant in order:
                v = variants.index(variant)
                r = measure(
                    config, [*args.base, *variant.split()], args.threads, args.steps, args.warmup
                )
                print(f"round {rnd + 1} {config.name} [{variant or 'baseline'}]: {r}", flush=True)
                rows[c, v] = r
                got[v] = r["images_per_s"]
                rates.setdefault((c, v), []).append(got[v])
            for v in got:
                ratios.setdefault((c, v), []).append(got[v] / got[0])
    lines = [
        "# Training throughput on CPU",
        "",
        "Produced by `python benchmarks/train_throughput.py "
        + " ".join(
            [str(c) for c in args.configs]
            + [f"--threads {args.threads} --steps {args.steps} --warmup {args.warmup}"]
            + [f"--base {b}" for b in args.base]
            + [f'--set "{v}"' for v in args.variants]
            + ([f"--rounds {args.rounds}"] if args.rounds > 1 else [])
        )
        + f"` ({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} torch threads).",
        "Lightning fit loop with data loading and augmentation, validation off; "
        f"{args.steps} timed batches after {args.warmup} warm-up batches; median of "
        f"{args.rounds} interleaved round(s). Ratio: the median per-round ratio to the baseline "
        "of the same round. Setup (reading the data, building the model) and warm-up (the "
        "warm-up batches, compilation included): the last round's seconds.",
        "",
        "| config | overrides | encoder | crop | batch | workers | precision | images/s "
        "| ratio | setup s | warm-up s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (c, v), r in sorted(rows.items()):
        lines.append(
            f"| {r['config']} | {variants[v] or 'baseline'} | {r['encoder']} | {r['crop']} "
            f"| {r['batch']} | {r['workers']} | {r['precision']} "
            f"| {statistics.median(rates[c, v]):.2f} | {statistics.median(ratios[c, v]):.3f} "
            f"| {r['setup_s']:.0f} | {r['warmup_s']:.0f} |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
