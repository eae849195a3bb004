"""Per-epoch val scores of training runs from the MLflow store, with the 7-class mIoU (six parts
and background) that the published Pascal-Person-Part tables use and the run's history.csv
leaves out: ``(6 * mIoU2 + IoU(background)) / 7``.

    python benchmarks/val_curves.py --store sqlite:////work/runs/mlflow.db RUN [RUN ...]
"""

from __future__ import annotations

import argparse

from mlflow.tracking import MlflowClient

KEYS = ("val/miou0", "val/miou1", "val/miou2", "val/iou2/background")


def curves(client: MlflowClient, run_name: str) -> list[tuple[int, list[float]]]:
    """(step, [mIoU0, mIoU1, mIoU2, 7-class]) per validation of the newest run of that name."""
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"attributes.run_name = '{run_name}'",
        order_by=["attributes.start_time DESC"],
    )
    if not runs:
        raise SystemExit(f"no MLflow run named {run_name!r}")
    by_step: dict[int, dict[str, float]] = {}
    for key in KEYS:
        for m in client.get_metric_history(runs[0].info.run_id, key):
            by_step.setdefault(m.step, {})[key] = m.value
    complete = [(step, v) for step, v in sorted(by_step.items()) if len(v) == len(KEYS)]
    if not complete:  # e.g. a person run (one level): its curves would be silently empty
        raise SystemExit(f"run {run_name!r} logged no validation with all of {', '.join(KEYS)}")
    return [
        (step, [v[k] for k in KEYS[:3]] + [(6 * v["val/miou2"] + v["val/iou2/background"]) / 7])
        for step, v in complete
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="MLflow run names (hiseg train's name=...)")
    parser.add_argument("--store", default="sqlite:///runs/mlflow.db", help="tracking URI")
    args = parser.parse_args()
    client = MlflowClient(args.store)
    for name in args.runs:
        print(f"{name}  (step: mIoU0 / mIoU1 / mIoU2 / 7-class)")
        for step, scores in curves(client, name):
            print(f"  {step}: " + " / ".join(f"{s:.4f}" for s in scores))


if __name__ == "__main__":
    main()
