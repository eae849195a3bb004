"""ONNX export, int8 quantisation and benchmarks of the tiny model trained in the test session."""

import dataclasses
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")

import hiseg  # noqa: E402
from hiseg.bench import (  # noqa: E402
    benchmark,
    model_variants,
    time_interleaved,
    write_markdown,
)
from hiseg.data import open_dataset  # noqa: E402
from hiseg.export import (  # noqa: E402
    MAX_MIOU_DROP,
    export_int8_if_close,
    export_onnx,
    quantize_int8,
    sample_images,
    strip_head_upsampling,
    validate_export,
)
from hiseg.models import load_checkpoint  # noqa: E402
from hiseg.predictor import load, resolve_model  # noqa: E402
from hiseg.spec import METADATA_KEY, SCHEMA_VERSION, ModelError, ModelSpec  # noqa: E402

#: One thread: on a CPU shared with other jobs, torch's OpenMP threads can run 50x slower.
THREADS = 1


@pytest.fixture(scope="module")
def val(tiny_data):
    return open_dataset(tiny_data, "val")


@pytest.fixture(scope="module")
def onnx_path(tiny_checkpoint, tmp_path_factory):
    return export_onnx(tiny_checkpoint, tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="module")
def full_resolution_path(tiny_checkpoint, tmp_path_factory):
    """hiseg 0.1's format: the head's upsampling kept, output at the input's size."""
    out = tmp_path_factory.mktemp("onnx") / "full.onnx"
    return export_onnx(tiny_checkpoint, out, full_resolution=True)


@pytest.fixture(scope="module")
def int8_path(onnx_path, tiny_data):
    train_images = sample_images(open_dataset(tiny_data, "train"), 4)
    return quantize_int8(onnx_path, onnx_path.with_name("tiny.int8.onnx"), train_images)


def test_export_has_dynamic_io_and_metadata(tiny_checkpoint, onnx_path):
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (image,), (logits,) = session.get_inputs(), session.get_outputs()
    assert (image.name, logits.name) == ("image", "logits")
    assert image.type == "tensor(float)" and image.shape == ["batch", 3, "height", "width"]
    assert logits.shape == ["batch", 7, "height_over_4", "width_over_4"]  # FPN's head: x4
    spec = ModelSpec.from_json(session.get_modelmeta().custom_metadata_map[METADATA_KEY])
    _, ckpt_spec = load_checkpoint(tiny_checkpoint)
    assert spec == ckpt_spec and spec.schema == SCHEMA_VERSION and spec.output_scale == 4
    assert spec.hiseg_version == hiseg.__version__
    assert (spec.precision, spec.default_clean) == ("fp32", 0)
    assert not list(onnx_path.parent.glob(".*.tmp"))  # the atomic write left nothing behind


def test_tf_same_padding_is_folded_into_the_convolutions(onnx_path):
    """Lite0's five stride-2 convs pad themselves; only the model's pad to a /32 size is left.
    That the folded graph still matches torch at odd sizes is checked by
    test_onnx_matches_torch_on_real_images_and_any_size."""
    graph = onnx.load(onnx_path).graph
    convs = [n for n in graph.node if n.op_type == "Conv"]
    same = [
        n for n in convs if any(a.name == "auto_pad" and a.s == b"SAME_UPPER" for a in n.attribute)
    ]
    assert len(same) == 5
    (pad,) = [n for n in graph.node if n.op_type == "Pad"]
    assert pad.input[0] == "image"
    # FPN's merge is plain Adds, which int8 keeps integer; smp's stack + sum would be ReduceSum
    assert not [n for n in graph.node if n.op_type == "ReduceSum"]


def test_a_stored_clean_up_is_the_predictors_default(tiny_checkpoint, onnx_path, tmp_path):
    cleaned = export_onnx(tiny_checkpoint, tmp_path / "cleaned.onnx", clean=50)
    assert load(cleaned).clean == 50
    assert load(cleaned, clean=0).clean == 0  # asked for explicitly: off
    assert load(onnx_path).clean == 0


def test_a_stored_long_side_is_the_predictors_default(tiny_checkpoint, onnx_path, tmp_path):
    """One checkpoint ships at two sizes: the export's ``long_side`` replaces the trained one."""
    trained = load(onnx_path).long_side
    smaller = export_onnx(tiny_checkpoint, tmp_path / "small.onnx", long_side=trained // 2)
    assert load(smaller).long_side == trained // 2
    image = np.zeros((trained, trained, 3), np.uint8)
    assert load(smaller).predict(image).labels.shape == (trained, trained)  # back at image size


def test_runtime_predicts_at_the_image_size(onnx_path, val):
    image, _ = val[0]
    result = load(onnx_path, threads=THREADS).predict(image)
    assert result.labels.shape == image.shape[:2]
    assert set(np.unique(result.labels)) <= set(result.tree.values)


def test_onnx_matches_torch_on_real_images_and_any_size(tiny_checkpoint, onnx_path, val):
    report = validate_export(
        tiny_checkpoint, onnx_path, [image for image, _ in val], threads=THREADS
    )
    assert report["images"] == 3 and report["ok"], report
    assert report["argmax_agreement"] >= 0.999 and report["max_abs_diff"] < 1e-3

    model, _ = load_checkpoint(tiny_checkpoint)
    inputs = [torch.randn(1, 3, 96, 160), torch.randn(2, 3, 131, 77)]  # one not a /32 multiple
    with torch.inference_mode():
        wanted = [model.predict_logits(x).numpy() for x in inputs]
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    for x, want in zip(inputs, wanted, strict=True):
        got = session.run(None, {"image": x.numpy()})[0]
        quarter = tuple(-(-side // 4) for side in x.shape[2:])  # 131 x 77 -> 33 x 20
        assert got.shape == want.shape == (x.shape[0], model.num_leaves, *quarter)
        assert (got.argmax(1) == want.argmax(1)).mean() >= 0.999


def test_int8_is_smaller_and_predicts_valid_labels(onnx_path, int8_path, val):
    assert int8_path.stat().st_size < 0.5 * onnx_path.stat().st_size
    predictor = load(int8_path, threads=THREADS)
    assert predictor.backends[0].spec.precision == "int8"
    image, _ = val[1]
    labels = predictor.predict(image).labels
    assert labels.shape == image.shape[:2]
    assert set(np.unique(labels)) <= set(predictor.tree.values)


def test_int8_kept_only_when_close(onnx_path, tiny_data, val, tmp_path):
    out = tmp_path / "kept.int8.onnx"
    calibration = sample_images(open_dataset(tiny_data, "train"), 2)
    report = export_int8_if_close(onnx_path, val, calibration, out=out, limit=2)
    assert report["images"] == 2 and set(report["fp32"]) == set(report["int8"]) == {"0", "1", "2"}
    assert report["kept"] == all(d <= MAX_MIOU_DROP for d in report["drop"].values())
    assert out.is_file() == report["kept"]
    assert sorted(p.name for p in tmp_path.iterdir()) == (["kept.int8.onnx"] * report["kept"])


def test_benchmark_rows(tiny_checkpoint, onnx_path, int8_path, tmp_path):
    rows = benchmark(
        [tiny_checkpoint, onnx_path], sizes=(64, 96), threads=THREADS, runs=2, warmup=1
    )
    kinds = {(r["runtime"], r["precision"], r["task"]) for r in rows}
    assert kinds == {
        ("torch", "fp32", "forward"),
        ("onnxruntime", "fp32", "forward"),
        ("onnxruntime", "fp32", "predict"),
        ("onnxruntime", "int8", "forward"),  # found beside the fp32 file
        ("onnxruntime", "int8", "predict"),
    }
    assert len(rows) == 10 and {r["input"] for r in rows if r["task"] == "forward"} == {
        "1x3x64x64",
        "1x3x96x96",
    }
    for row in rows:
        assert row["threads"] == THREADS
        assert row["p90_ms"] >= row["median_ms"] > 0 and row["images_per_s"] > 0
    table = write_markdown(rows, tmp_path / "bench.md", "hiseg bench tiny.onnx").read_text()
    assert "`hiseg bench tiny.onnx`" in table and table.count("\n| ") == 1 + len(rows)

    other = tmp_path / "other" / onnx_path.name
    other.parent.mkdir()
    other.write_bytes(onnx_path.read_bytes())
    rows = benchmark([onnx_path, other], sizes=(64,), threads=THREADS, runs=1, warmup=0)
    assert {r["model"] for r in rows} == {
        f"{onnx_path.parent.name}/tiny.onnx",
        "other/tiny.onnx",
        "tiny.int8.onnx",
    }


def test_benchmark_times_each_model_at_its_own_size_by_default(onnx_path, int8_path):
    """As ``predict`` runs it: the tiny model at its 160 px, the bundled person model at 320 px
    (named, not a path)."""
    rows = benchmark([onnx_path, "person"], threads=THREADS, runs=1, warmup=0)
    forward = {r["model"]: r["input"] for r in rows if r["task"] == "forward"}
    assert forward == {
        "tiny.onnx": "1x3x160x128",
        "tiny.int8.onnx": "1x3x160x128",
        "person.onnx": "1x3x320x256",
    }
    assert model_variants("person") == [resolve_model("person")]


def test_onnx_prediction_never_imports_torch(onnx_path, val):
    code = (
        "import sys\n"
        "from hiseg.predictor import load\n"
        "result = load(sys.argv[1], threads=1).predict(sys.argv[2])\n"
        "assert result.labels.ndim == 2\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    image = val.samples[0].image_path
    subprocess.run([sys.executable, "-c", code, onnx_path, image], check=True, timeout=120)


def test_checking_an_export_on_no_image_is_a_model_error(tmp_path):
    """An empty val split: named as such, not reported as an export that disagrees."""
    with pytest.raises(ModelError, match=r"tiny\.onnx: no image to check the export on"):
        validate_export(tmp_path / "tiny.ckpt", tmp_path / "tiny.onnx", [])


def test_int8_without_calibration_images_is_a_model_error(tmp_path):
    """E.g. an empty calibration split: named, before any file is read or written."""
    with pytest.raises(ModelError, match=r"tiny\.onnx: int8 calibration needs at least one"):
        quantize_int8(tmp_path / "tiny.onnx", tmp_path / "tiny.int8.onnx", [])
    assert not any(tmp_path.iterdir())


def test_benchmark_of_no_model_file_is_a_model_error(tmp_path):
    with pytest.raises(ModelError, match=r"missing\.onnx: no such model file.*bundled.*person\)"):
        benchmark(tmp_path / "missing.onnx")


def test_benchmarking_only_checkpoints_without_torch_is_refused(tmp_path, monkeypatch):
    """It returned no row at all, which printed an empty table as if it had run."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "torch" else find_spec(name)
    )
    (tmp_path / "run.ckpt").write_bytes(b"")
    with pytest.raises(ModelError, match=r"run\.ckpt: timing a \.ckpt needs torch"):
        benchmark(tmp_path / "run.ckpt")


def test_benchmark_rows_are_timed_in_turns():
    calls = []
    times = time_interleaved([lambda: calls.append("a"), lambda: calls.append("b")], 3, 1)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-up of each, then one of each per round
    assert [len(t) for t in times] == [3, 3]


def _with_metadata(proto, spec: ModelSpec, path):
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, {METADATA_KEY: spec.to_json()})
    onnx.save(proto, path)
    return path


def test_an_output_that_does_not_fit_the_tree_is_a_model_error(tmp_path):
    """Two leaves out of a network whose metadata says seven: refused on load when the graph
    says so, else on the first run (was a reshape crash)."""
    from hiseg.spec import ModelError
    from hiseg.taxonomy import load_tree

    pascal = load("pascal-person-part").backends[0].spec
    wrong = _with_metadata(onnx.load(resolve_model("person")), pascal, tmp_path / "static.onnx")
    with pytest.raises(ModelError, match=r"static\.onnx: the network's output 'logits' has shape"):
        load(wrong)

    # channels unknown until run: the check happens on the first output
    image = onnx.helper.make_tensor_value_info(
        "image", onnx.TensorProto.FLOAT, ["b", "c", "h", "w"]
    )
    logits = onnx.helper.make_tensor_value_info(
        "logits", onnx.TensorProto.FLOAT, ["b", "c", "h", "w"]
    )
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["image"], ["logits"])], "three", [image], [logits]
    )
    proto = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)])
    proto.ir_version = 8
    person = dataclasses.replace(pascal, tree=load_tree("person"))
    dynamic = load(_with_metadata(proto, person, tmp_path / "dynamic.onnx"))
    with pytest.raises(ModelError, match=r"dynamic\.onnx: the network returned shape \(1, 3, "):
        dynamic.predict(np.zeros((40, 30, 3), np.uint8))


#: Share of pixels on which a stripped model's labels equal its full-resolution original's,
#: per image: the bundled models 0.9988 on average and at least 0.9946 on Pascal-Person-Part
#: val, 0.9983 and 0.9970 on PicsArt valid (benchmarks/quarter_output.md); the tiny test model,
#: barely trained, has ragged borders everywhere: 0.9901-0.9947 on its three val images.
MIN_STRIPPED_AGREEMENT = 0.98


def test_stripping_the_heads_upsampling_keeps_the_labels(
    full_resolution_path, onnx_path, int8_path, val, tmp_path
):
    """An old (full-resolution) export stripped by graph surgery: its output is 1/4 of its input
    (rounded up), it is the graph ``hiseg export`` now writes, and its labels through the
    pipeline are the original's on nearly every pixel."""
    stripped = tmp_path / "stripped.onnx"
    spec = strip_head_upsampling(full_resolution_path, stripped)
    original = load(full_resolution_path, threads=THREADS)
    assert original.backends[0].spec.output_scale == 1
    assert spec == dataclasses.replace(original.backends[0].spec, output_scale=4)
    session = ort.InferenceSession(str(stripped), providers=["CPUExecutionProvider"])
    assert ModelSpec.from_json(session.get_modelmeta().custom_metadata_map[METADATA_KEY]) == spec
    exported = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    # 100 x 68: multiples of 4 but not of 32, where ceil(size / 4) differs from (size + 4) // 4
    sizes = [((1, 3, 64, 96), (16, 24)), ((2, 3, 131, 77), (33, 20)), ((1, 3, 100, 68), (25, 17))]
    for shape, small in sizes:
        x = np.random.default_rng(0).normal(size=shape).astype(np.float32)
        got = session.run(None, {"image": x})[0]
        assert got.shape == (shape[0], 7, *small)
        np.testing.assert_allclose(got, exported.run(None, {"image": x})[0], atol=1e-5)
    quarter = load(stripped, threads=THREADS)
    for image, _ in val:
        agree = (quarter.predict(image).labels == original.predict(image).labels).mean()
        assert agree >= MIN_STRIPPED_AGREEMENT, agree
    with pytest.raises(ModelError, match="already outputs 1/4 of its input"):
        strip_head_upsampling(stripped, tmp_path / "twice.onnx")


def test_stripping_keeps_the_int8_quantisation(tiny_data, full_resolution_path, tmp_path):
    calibration = sample_images(open_dataset(tiny_data, "train"), 2)
    int8 = quantize_int8(full_resolution_path, tmp_path / "full.int8.onnx", calibration)
    stripped = tmp_path / "stripped.int8.onnx"
    spec = strip_head_upsampling(int8, stripped)
    assert (spec.precision, spec.output_scale) == ("int8", 4)

    def ops(path):
        return sorted(n.op_type for n in onnx.load(path).graph.node)

    before, after = ops(int8), ops(stripped)
    assert before.count("Resize") == after.count("Resize") + 1  # the head's; the FPN's stay
    for op in ("QuantizeLinear", "DequantizeLinear", "Conv"):
        assert before.count(op) == after.count(op), op
    labels = load(stripped, threads=THREADS).predict(np.zeros((40, 30, 3), np.uint8)).labels
    assert labels.shape == (40, 30)


def test_an_old_full_resolution_export_predicts_exactly_as_before(full_resolution_path):
    """``output_scale`` 1 keeps the previous pipeline: the fast path gives the labels of hiseg
    0.1's written-out computation (full-size bilinear map, decoded everywhere)."""
    from reference import reference_labels

    predictor = load(full_resolution_path, threads=THREADS, clean=0)
    for h, w in [(75, 100), (67, 51)]:
        image = np.random.default_rng(h).integers(0, 256, (h, w, 3), np.uint8)
        image = np.ascontiguousarray(image.repeat(2, 0)[:h].repeat(2, 1)[:, :w])
        want = reference_labels(full_resolution_path, image)
        np.testing.assert_array_equal(predictor.predict(image).labels, want)


def test_a_head_that_does_not_upsample_exports_at_full_resolution(tiny_data, tmp_path):
    """Unet's head outputs the input's size: nothing to strip, ``output_scale`` 1."""
    from hiseg.models import create_model

    model = create_model("unet", "tf_efficientnet_lite0", "pascal-person-part", pretrained=False)
    checkpoint = tmp_path / "unet.ckpt"
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"state_dict": state, METADATA_KEY: model.spec(128).to_json()}, checkpoint)
    exported = export_onnx(checkpoint, tmp_path / "unet.onnx")
    spec = load(exported).backends[0].spec
    assert spec.output_scale == model.output_scale == 1
    x = np.random.default_rng(0).normal(size=(1, 3, 64, 96)).astype(np.float32)
    session = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"])
    assert session.run(None, {"image": x})[0].shape == (1, 7, 64, 96)
    images = sample_images(open_dataset(tiny_data, "val"), 2)
    assert validate_export(checkpoint, exported, images, threads=THREADS)["ok"]


def test_a_full_resolution_export_is_validated_against_the_full_resolution_model(
    tiny_checkpoint, full_resolution_path, val
):
    report = validate_export(
        tiny_checkpoint, full_resolution_path, [image for image, _ in val], threads=THREADS
    )
    assert report["ok"] and report["max_abs_diff"] < 1e-3, report
    assert report["pixels"] > 3 * 100 * 100  # full resolution: every resized pixel compared
