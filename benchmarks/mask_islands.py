"""How many masks of a split hold pieces outside their largest person region (blobs, specks)?

    python benchmarks/mask_islands.py --data ../shared/data/picsart-person --split train

Counts, per mask, the foreground connected components (8-connected) besides the largest, and
lists the masks with at least ``--min-pixels`` outside it, in benchmarks/mask_islands_<split>.md.
A second person also counts as an island, so the list is for inspection, not for dropping.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from hiseg.data import open_dataset, person_components

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--split", default="train")
    parser.add_argument("--min-pixels", type=int, default=200)
    args = parser.parse_args()
    dataset = open_dataset(args.data, args.split)
    rows = []  # id, components, pixels outside the largest, foreground pixels
    for sample in dataset.samples:
        areas = sorted(person_components(dataset.read_labels(sample), dataset.tree)[1][1:])
        rows.append((sample.id, len(areas), int(sum(areas[:-1])), int(sum(areas))))
    several = sum(r[1] > 1 for r in rows)
    flagged = sorted((r for r in rows if r[2] >= args.min_pixels), key=lambda r: -r[2] / r[3])
    command = f"python benchmarks/mask_islands.py --data {args.data} --split {args.split}"
    lines = [
        f"# Islands in the `{args.split}` masks of {args.data.name}",
        "",
        f"Produced by `{command}`.",
        "",
        f"{len(rows)} masks; {several} have more than one foreground component; "
        f"{len(flagged)} have at least {args.min_pixels} pixels outside their largest one:",
        "",
        "| id | components | pixels outside the largest | share of the mask |",
        "| --- | --- | --- | --- |",
        *[f"| {i} | {n} | {out} | {out / total:.3f} |" for i, n, out, total in flagged],
    ]
    path = HERE / f"mask_islands_{args.split}.md"
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
