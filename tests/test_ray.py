"""``--engine ray`` on a local 2-CPU Ray cluster (one per module; Ray has no local mode): the
same label maps and scores as the local engine, bad inputs reported without stopping the job,
and a re-run resuming where the last one ended."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from synthetic import scene
from typer.testing import CliRunner

from hiseg.cli import app
from hiseg.distributed import DONE_FOLDER, EngineError, plan_actors, read_done, require_ray

ROOT = Path(__file__).resolve().parents[1]
#: A small network input keeps the default (six-part) model fast; the tree and decoding are the
#: same at any size.
FAST = ["--long-side", "192"]


@pytest.fixture(scope="module")
def cluster():
    ray = pytest.importorskip("ray", reason="Ray is the ray extra: pip install 'hiseg[ray]'")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def predict(*args: str) -> tuple[int, str]:
    result = CliRunner().invoke(app, ["predict", *args])
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """The bundled example photos and two drawn scenes (one grey, one with alpha), a corrupt
    JPEG and a text file, in one folder."""
    folder = tmp_path_factory.mktemp("photos")
    for path in (ROOT / "examples").glob("*.jpg"):
        shutil.copy(path, folder)
    rng = np.random.default_rng(5)
    Image.fromarray(scene(320, 240, rng, people=2)[0]).convert("L").save(folder / "grey.png")
    Image.fromarray(scene(200, 300, rng, people=1)[0]).convert("RGBA").save(folder / "alpha.png")
    (folder / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a JPEG")
    (folder / "notes.txt").write_text("not an image\n")
    return folder


def test_same_labels_as_local_bad_files_reported_and_resume(cluster, photos, tmp_path):
    good = sorted(p.name for p in photos.iterdir() if p.suffix in (".jpg", ".png"))
    good.remove("corrupt.jpg")
    listing = photos / "listing.txt"
    # relative paths are read from the listing's folder; one absolute path; one missing file
    names = [*good, "corrupt.jpg", "notes.txt", "missing.jpg"]
    listing.write_text("\n".join([*names[:-1], str(photos / names[-1])]) + "\n")

    code, output = predict(*[str(photos / n) for n in good], "-o", str(tmp_path / "local"), *FAST)
    assert code == 0, output
    code, output = predict(
        str(listing), "--engine", "ray", "-o", str(tmp_path / "ray"), "--json", *FAST
    )
    assert code == 1, output  # some inputs failed; the others finished
    assert f"segmented {len(good)} of {len(names)} input(s)" in output

    for name in good:
        stem = Path(name).stem
        local, distributed = tmp_path / "local" / f"{stem}.png", tmp_path / "ray" / f"{stem}.png"
        assert local.read_bytes() == distributed.read_bytes(), name
        assert (tmp_path / "ray" / f"{stem}_overlay.jpg").is_file()
    with (tmp_path / "ray" / "failed.csv").open() as f:
        failed = {row["path"]: row["reason"] for row in csv.DictReader(f)}
    assert failed == {
        "corrupt.jpg": failed["corrupt.jpg"],
        "notes.txt": "not an image (unknown or corrupt format)",
        str(photos / "missing.jpg"): "file not found",
    }
    assert "corrupt" in failed["corrupt.jpg"] or "truncated" in failed["corrupt.jpg"]
    summary = json.loads((tmp_path / "ray" / "summary.json").read_text())
    assert sorted(item["image"] for item in summary["images"]) == good
    assert {item["input"] for item in summary["failed"]} == set(failed)

    # a re-run skips every finished image; a lost output makes its image run again
    before = sorted(p.name for p in (tmp_path / "ray").iterdir())
    (tmp_path / "ray" / "group_overlay.jpg").unlink()
    code, output = predict(str(listing), "--engine", "ray", "-o", str(tmp_path / "ray"), *FAST)
    assert f"segmented 1 of {len(names)} input(s) ({len(good) - 1} done by an earlier run" in output
    after = sorted(p.name for p in (tmp_path / "ray").iterdir())
    assert set(after) - set(before) == {"failed_2.csv", "group_2.png", "group_2_overlay.jpg"}


def test_eval_on_ray_merges_worker_matrices_into_the_local_scores(cluster, tiny_data, tmp_path):
    scores = {}
    for engine in ("local", "ray"):
        out = tmp_path / f"{engine}.json"
        args = ["eval", "--data", str(tiny_data), "--split", "train", "-m", "pascal-person-part"]
        args += ["--json", str(out)]  # 8 images: 2 batches of 4, on both actors
        result = CliRunner().invoke(app, [*args, "--engine", engine, "--worst", "2", *FAST])
        assert result.exit_code == 0, result.output
        scores[engine] = json.loads(out.read_text())
    assert scores["ray"] == scores["local"]
    assert scores["ray"]["n_images"] == 8


def test_resume_reads_only_whole_records_of_existing_outputs(tmp_path):
    (tmp_path / "a.png").touch()
    (tmp_path / "b.png").touch()
    (tmp_path / DONE_FOLDER).mkdir()
    (tmp_path / DONE_FOLDER / "w1.jsonl").write_text(
        '["/in/a.jpg", "a.png"]\n["/in/c.jpg", "c.png"]\n'
    )
    (tmp_path / DONE_FOLDER / "w2.jsonl").write_text('["/in/b.jpg", "b.png"]')  # cut by a crash
    assert read_done(tmp_path) == {"/in/a.jpg"}
    # damaged lines (not JSON, not a list, not names) are not done; the job does not crash
    (tmp_path / DONE_FOLDER / "w3.jsonl").write_text('["/in/b.jpg", "b.p\n{}\n7\n[1, 2]\n[]\n')
    assert read_done(tmp_path) == {"/in/a.jpg"}


def test_actors_times_threads_fill_the_cores():
    assert plan_actors(8, None, None) == (8, 1)
    assert plan_actors(8, 2, None) == (2, 4)
    assert plan_actors(8, None, 4) == (2, 4)
    assert plan_actors(2, 1, None) == (1, 2)


def test_without_ray_one_line_names_the_extra(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)
    with pytest.raises(EngineError, match=r"pip install 'hiseg\[ray\]'"):
        require_ray()
    image = tmp_path / "x.png"
    Image.new("RGB", (40, 30)).save(image)
    code, output = predict(str(image), "--engine", "ray", "-o", str(tmp_path / "out"))
    assert code == 2 and "error: --engine ray needs Ray Data: pip install 'hiseg[ray]'" in output


def test_eval_on_ray_names_a_bad_image_as_the_local_engine_does(cluster, tiny_data, tmp_path):
    data = shutil.copytree(tiny_data, tmp_path / "data")
    bad = data / "images" / f"{(data / 'val.txt').read_text().split()[0]}.jpg"
    bad.write_text("not a JPEG")
    args = ["eval", "--data", str(data), "-m", "pascal-person-part", "--engine", "ray", *FAST]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert f"error: {bad}: not an image (unknown or corrupt format)" in result.output


def test_csv_and_parquet_listings_and_more_workers_than_cores(cluster, photos, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.csv").write_text(f"path,album\n{photos / 'group.jpg'},2024\n")
    pq.write_table(pa.table({"path": [str(photos / "grey.png")]}), tmp_path / "b.parquet")
    listings = [str(tmp_path / "a.csv"), str(tmp_path / "b.parquet")]
    code, output = predict(
        *listings, "--engine", "ray", "--workers", "3", "-o", str(tmp_path / "o")
    )
    assert code == 0, output
    assert {"group.png", "grey.png"} <= {p.name for p in (tmp_path / "o").iterdir()}
