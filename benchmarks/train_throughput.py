"""Training throughput (images/s) of each config on this CPU, through the real `hiseg train` path.

    python benchmarks/train_throughput.py [CONFIG ...] [--threads 2] [--steps 30] [--warmup 5]

Runs Lightning's fit loop (data loading, augmentation, bf16 autocast, channels_last, optimiser) for
warmup + steps batches with validation off, times the steps after the warmup, and writes
benchmarks/train_throughput.md.
"""

from __future__ import annotations

import argparse
import os
import platform
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
        self.warmup, self.start, self.images = warmup, 0.0, 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx + 1 == self.warmup:
            self.start = time.perf_counter()
        elif batch_idx + 1 > self.warmup:
            self.images += len(batch[0])

    def rate(self) -> float:
        return self.images / (time.perf_counter() - self.start)


def measure(config_path: Path, threads: int, steps: int, warmup: int) -> dict:
    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as out:
        config = load_config(config_path, [f"out_dir={out}", "tracking.mlflow=false"])
        norm = preprocessing(config.model.encoder)
        train_loader, _, train_data = build_loaders(config, norm["mean"], norm["std"])
        task = SegmentationTask(config, train_data.tree.to_dict())
        timer = StepTimer(warmup)
        t = config.trainer
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            precision=t.precision,
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
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="*", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--out", type=Path, default=HERE / "train_throughput.md")
    args = parser.parse_args()
    configs = args.configs or sorted((HERE.parent / "configs").glob("*.yaml"))
    rows = [measure(c, args.threads, args.steps, args.warmup) for c in configs]
    lines = [
        "# Training throughput on CPU",
        "",
        "Produced by `python benchmarks/train_throughput.py "
        f"--threads {args.threads} --steps {args.steps} --warmup {args.warmup}` "
        f"({time.strftime('%Y-%m-%d')}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} cores, torch {torch.__version__}, {args.threads} torch threads).",
        "Lightning fit loop with data loading and augmentation, validation off; "
        f"{args.steps} timed batches after {args.warmup} warm-up batches.",
        "",
        "| config | arch | encoder | crop | batch | loader workers | precision | images/s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['config']} | {r['arch']} | {r['encoder']} | {r['crop']} | {r['batch']} "
            f"| {r['workers']} | {r['precision']} | {r['images_per_s']:.2f} |"
        )
    args.out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
