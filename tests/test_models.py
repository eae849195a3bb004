"""Model factory: offline EfficientNet-Lite ImageNet weights, every architecture, checkpoints."""

from __future__ import annotations

import dataclasses
import socket
import time
from pathlib import Path

import pytest

torch = pytest.importorskip("torch", reason="hiseg.models needs the 'train' extra (torch)")
pytest.importorskip("segmentation_models_pytorch", reason="needs the 'train' extra")
timm = pytest.importorskip("timm", reason="needs the 'train' extra")

import hiseg  # noqa: E402
from hiseg import models  # noqa: E402
from hiseg.models import (  # noqa: E402
    ARCHITECTURES,
    create_model,
    load_lite_imagenet_state,
    model_from_spec,
    preprocessing,
)
from hiseg.spec import ModelSpec  # noqa: E402
from hiseg.taxonomy import load_tree  # noqa: E402

LITE0 = "tf_efficientnet_lite0"


@pytest.fixture(scope="module")
def tree():
    return load_tree("pascal-person-part")


@pytest.fixture(scope="module")
def lite0_state():
    return load_lite_imagenet_state(LITE0)


def test_lite0_weights_classify_chelsea_as_egyptian_cat(lite0_state):
    data = pytest.importorskip("skimage.data", reason="needs scikit-image (dev extra)")
    net = timm.create_model(LITE0, pretrained=False).eval()
    net.load_state_dict(lite0_state, strict=True)
    image = torch.from_numpy(data.chelsea()).permute(2, 0, 1)[None].float() / 255
    image = torch.nn.functional.interpolate(
        image, size=(224, 224), mode="bilinear", antialias=True, align_corners=False
    )
    with torch.no_grad():
        logits = net((image - 0.5) / 0.5)
    assert logits.argmax(1).item() == 285  # ImageNet "Egyptian cat"


@pytest.mark.parametrize("name", ["tf_efficientnet_lite1", "tu-tf_efficientnet_lite2"])
def test_lite1_lite2_states_fit_timm(name):
    state = load_lite_imagenet_state(name)
    net = timm.create_model(name.removeprefix("tu-"), pretrained=False)
    net.load_state_dict(state, strict=True)


def test_pretrained_lite_encoder_holds_the_mapped_weights(tree, lite0_state):
    keys = [
        "conv_stem.weight",
        "bn1.running_var",
        "blocks.3.1.conv_dw.weight",
        "blocks.6.0.bn3.bias",
    ]
    loaded = create_model("fpn", LITE0, tree, pretrained=True).net.encoder.model.state_dict()
    for key in keys:
        assert torch.equal(loaded[key], lite0_state[key]), key
    fresh = create_model("fpn", LITE0, tree, pretrained=False).net.encoder.model.state_dict()
    assert not torch.equal(fresh["conv_stem.weight"], lite0_state["conv_stem.weight"])


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_architecture_outputs_leaf_logits(tree, arch):
    model = create_model(arch.upper(), LITE0, tree, pretrained=False).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 128, 160))
    assert out.shape == (2, tree.num_leaves, 128, 160) == (2, 7, 128, 160)


def test_input_size_need_not_be_a_multiple_of_32(tree):
    model = create_model("unet", LITE0, tree, pretrained=False).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 100, 75)).shape == (1, 7, 100, 75)


def test_predicted_logits_are_the_forward_before_the_heads_upsampling(tree):
    """What the pipeline restores (and ``hiseg export`` writes): FPN's head upsamples x4 with
    align_corners on the padded grid; that step is left out, the crop rounds up."""
    fpn = create_model("fpn", LITE0, tree, pretrained=False).eval()
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        small = fpn.predict_logits(x)
        upsampled = torch.nn.functional.interpolate(
            small, scale_factor=4, mode="bilinear", align_corners=True
        )
        assert fpn.output_scale == 4 and small.shape == (1, 7, 16, 24)
        torch.testing.assert_close(upsampled, fpn(x), atol=1e-4, rtol=1e-4)
        odd = fpn.predict_logits(x[..., :61, :90])  # padded with zeros to 64 x 96 as forward
        assert odd.shape == (1, 7, 16, 23)
        x[..., 61:, :] = 0
        x[..., 90:] = 0
        torch.testing.assert_close(odd, fpn.predict_logits(x)[..., :16, :23])
        unet = create_model("unet", LITE0, tree, pretrained=False).eval()  # no upsampling head
        assert unet.output_scale == 1 and torch.equal(unet.predict_logits(x), unet(x))


NARROW_FPN = {"decoder_pyramid_channels": 64, "decoder_segmentation_channels": 32}


@pytest.mark.parametrize("decoder", [None, NARROW_FPN])
def test_spec_rebuilds_an_identical_model(tree, decoder):
    model = create_model("fpn", f"tu-{LITE0}", tree, pretrained=False, decoder=decoder).eval()
    spec = ModelSpec.from_json(model.spec(long_side=320, train_size=256).to_json())  # as stored
    assert spec.decoder == (decoder or {})
    assert spec.arch == "fpn" and spec.encoder == f"tu-{LITE0}"
    assert spec.mean == spec.std == (0.5, 0.5, 0.5) and spec.output_stride == 32
    assert spec.output_scale == 4  # what predict_logits outputs
    assert (spec.long_side, spec.train_size) == (320, 256)
    rebuilt = model_from_spec(spec).eval()
    rebuilt.load_state_dict(model.state_dict())
    assert rebuilt.tree_name == model.tree_name == "pascal-person-part"
    assert [n.name for n in rebuilt.tree.leaves] == [n.name for n in tree.leaves]
    x = torch.randn(1, 3, 64, 96)
    with torch.no_grad():
        assert torch.equal(model(x), rebuilt(x))


def test_decoder_options_reach_the_architecture(tree):
    default = create_model("fpn", LITE0, tree, pretrained=False)
    narrow = create_model("fpn", LITE0, tree, pretrained=False, decoder=NARROW_FPN)
    assert narrow.net.decoder.seg_blocks[0].block[0].block[0].out_channels == 32
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(narrow) < count(default) - 1_000_000
    with pytest.raises(ValueError, match=r"decoder options \{'bogus': 1\}"):
        create_model("fpn", LITE0, tree, pretrained=False, decoder={"bogus": 1})


def test_preprocessing_per_encoder():
    lite = {"mean": (0.5, 0.5, 0.5), "std": (0.5, 0.5, 0.5)}
    assert preprocessing(LITE0) == preprocessing(f"tu-{LITE0}") == lite
    assert preprocessing("resnet18") == {
        "mean": (0.485, 0.456, 0.406),
        "std": (0.229, 0.224, 0.225),
    }


def test_unknown_names_list_the_known_ones(tree):
    with pytest.raises(ValueError, match="known: fpn, deeplabv3plus"):
        create_model("no-such-arch", LITE0, tree, pretrained=False)
    with pytest.raises(ValueError, match=r"unknown encoder 'no-such-encoder'.*resnet18"):
        create_model("fpn", "no-such-encoder", tree, pretrained=False)
    with pytest.raises(ValueError, match="architecture 'linknet' on encoder 'mit_b0'"):
        create_model("linknet", "mit_b0", tree, pretrained=False)


def test_offline_download_fails_fast_and_clearly(tree):
    from huggingface_hub import constants as hf

    offline_before = hf.HF_HUB_OFFLINE
    start = time.monotonic()
    try:
        create_model("fpn", "resnet18", tree, pretrained=True)
    except RuntimeError as err:
        message = str(err)
    else:
        pytest.skip("resnet18 weights were downloaded or cached: this machine is online")
    assert time.monotonic() - start < 30
    assert "'resnet18'" in message and "pretrained=False" in message
    assert "tf_efficientnet_lite0" in message
    assert socket.getdefaulttimeout() is None and hf.HF_HUB_OFFLINE is offline_before  # restored


@pytest.fixture
def silent_server():
    """An HTTP endpoint that accepts connections and never answers, like a blackholing proxy."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    server.close()


def test_a_silent_weight_host_does_not_hang_create_model(tree, silent_server, monkeypatch):
    from huggingface_hub import constants as hf

    monkeypatch.setattr(models, "DOWNLOAD_TIMEOUT", 1.0)
    monkeypatch.setattr(hf, "ENDPOINT", silent_server)
    start = time.monotonic()
    assert not models._reachable(silent_server, 1.0)
    assert time.monotonic() - start < 2.5
    try:
        create_model("deeplabv3plus", "tu-resnet18", tree, pretrained=True)
    except RuntimeError as err:
        assert "'tu-resnet18'" in str(err) and "unreachable" in str(err)
    else:
        pytest.skip("tu-resnet18 weights are cached")
    assert time.monotonic() - start < 10


def test_fpn_merge_adds_like_smp():
    from segmentation_models_pytorch.decoders.fpn.decoder import MergeBlock

    from hiseg.models import AddMerge

    model = create_model("fpn", "tf_efficientnet_lite0", "person", pretrained=False)
    assert isinstance(model.net.decoder.merge, AddMerge)
    x = [torch.randn(2, 8, 5, 7) for _ in range(4)]
    torch.testing.assert_close(model.net.decoder.merge(x), MergeBlock("add")(x))


# -- checkpoints: the spec, old ones, and no code run on load ------------------------------------


def _checkpoint(path, model, stored) -> None:
    state = {f"model.{k}": v for k, v in model.state_dict().items()}
    torch.save({"epoch": 1, "state_dict": state, "hiseg": stored}, path)


def test_new_and_old_checkpoints_load_with_their_spec(tree, tmp_path):
    model = create_model("fpn", LITE0, tree, pretrained=False, decoder=NARROW_FPN).eval()
    spec = model.spec(long_side=256, train_size=192)
    legacy = {  # what hiseg 0.1 (and a training started with it) writes
        "version": "0.1.0",
        "model": {
            "arch": "fpn",
            "encoder": f"tu-{LITE0}",
            "decoder": NARROW_FPN,
            "tree": tree.to_dict(),
            "mean": [0.5, 0.5, 0.5],
            "std": [0.5, 0.5, 0.5],
            "output_stride": 32,
        },
        "long_side": 256,
        "train_size": 192,
    }
    x = torch.randn(1, 3, 64, 96)
    for name, stored in [("new.ckpt", spec.to_json()), ("old.ckpt", legacy)]:
        _checkpoint(tmp_path / name, model, stored)
        loaded, got = models.load_checkpoint(tmp_path / name)
        assert dataclasses.replace(got, hiseg_version="") == dataclasses.replace(
            spec, hiseg_version=""
        )
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))


class _Payload:
    """Unpickling this calls ``_payload_ran``: what a hostile checkpoint would do."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (_payload_ran, (self.marker,))


def _payload_ran(marker: str) -> None:
    with open(marker, "w") as f:
        f.write("code from the checkpoint ran")


def test_a_checkpoint_that_would_run_code_is_refused(tree, tmp_path):
    model = create_model("fpn", LITE0, tree, pretrained=False)
    marker = tmp_path / "ran"
    path = tmp_path / "hostile.ckpt"
    _checkpoint(path, model, model.spec(256).to_json())
    checkpoint = torch.load(path, weights_only=True)
    checkpoint["callbacks"] = {"x": _Payload(marker)}
    torch.save(checkpoint, path)
    with pytest.raises(
        models.ModelError, match=r"hostile\.ckpt: refused, .* would call .*_payload_ran"
    ):
        models.load_checkpoint(path)
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is live: an unsafe load runs it
    assert marker.exists()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (b"not a checkpoint", "not a readable checkpoint"),
        (None, "no such checkpoint"),
        ("onnx", "an ONNX model, not a checkpoint; this needs the .ckpt from `hiseg train`"),
    ],
)
def test_unreadable_checkpoints_are_one_clear_error(tmp_path, content, reason):
    path = tmp_path / "bad.ckpt"
    if content == "onnx":  # e.g. `hiseg export model.onnx`, or --backend torch on one
        path = Path(hiseg.__file__).parent / "weights" / "person.onnx"
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(models.ModelError, match=reason):
        models.load_checkpoint(path)


@pytest.mark.parametrize(("field", "value"), [("arch", "nonet"), ("encoder", "no_such_encoder")])
def test_a_checkpoint_of_an_unknown_model_is_one_clear_error(tree, tmp_path, field, value):
    """E.g. a checkpoint from a newer hiseg: a ModelError naming the file, not a ValueError."""
    model = create_model("fpn", LITE0, tree, pretrained=False)
    spec = dataclasses.replace(model.spec(256), **{field: value})
    path = tmp_path / "foreign.ckpt"
    _checkpoint(path, model, spec.to_json())
    with pytest.raises(models.ModelError, match=rf"foreign\.ckpt: .*'{value}'"):
        models.load_checkpoint(path)
