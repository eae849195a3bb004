"""What a trained model is, in one typed, versioned record: :class:`ModelSpec`.

The same JSON text (:meth:`ModelSpec.to_json`) is stored under the one key :data:`METADATA_KEY`
in an exported ONNX file's metadata and in a ``hiseg train`` checkpoint, so a model file alone is
enough to predict. Reading it back (:meth:`ModelSpec.from_json`) checks every field and its type,
refuses a spec written by a newer hiseg, and still reads the untyped dict of hiseg 0.1 (schema 0:
``{"version", "model": {"arch", ..., "tree", "mean", "std", "output_stride"}, "long_side", ...}``),
the format of older bundled models and checkpoints. Schema 1 lacks ``output_scale`` (always 1).

Plain Python and NumPy only: the ONNX runtime path imports it without torch.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from hiseg.errors import HisegError
from hiseg.taxonomy import Tree, TreeError

#: Key of the spec in ONNX metadata and in checkpoints (the same key hiseg 0.1 used).
METADATA_KEY = "hiseg"
#: The newest spec format, written for models with a 1/k output; it reads this one and every
#: older one. Schema 2 added ``output_scale``: a hiseg that reads only schema 1 would take a
#: 1/4-size output for the image, so full-size models are still written as schema 1.
SCHEMA_VERSION = 2
PRECISIONS = ("fp32", "fp16", "int8")


class ModelError(HisegError, ValueError):
    """A model cannot be found or loaded; the message names it and says why."""


@dataclass(frozen=True, eq=False)
class ModelSpec:
    """A trained model: how to rebuild the network, what its outputs mean, how to feed it.

    ``long_side`` is the inference size (an image's long side is resized to it), ``train_size``
    the crop size it was trained on, ``output_stride`` the multiple the network input's sides are
    padded to, ``output_scale`` how many input pixels one output pixel spans along each side (4:
    the network stops before its head's bilinear x4 upsampling, which the pipeline does on the
    probabilities instead, see :mod:`hiseg.pipeline`), ``default_clean`` the clean-up
    (:mod:`hiseg.postprocess`) a predictor applies unless told otherwise, ``hiseg_version`` the
    hiseg that wrote it.
    """

    arch: str
    encoder: str
    tree: Tree
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    long_side: int
    train_size: int | None = None
    decoder: Mapping[str, Any] = field(default_factory=dict)
    output_stride: int = 32
    output_scale: int = 1
    precision: str = "fp32"
    default_clean: int = 0
    hiseg_version: str = ""
    schema: int = SCHEMA_VERSION

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ModelSpec) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]  # equal specs hold equal (unhashable) dicts

    @property
    def num_leaves(self) -> int:
        return self.tree.num_leaves

    def to_dict(self) -> dict[str, Any]:
        """JSON types only (so a checkpoint holding it loads with ``weights_only=True``). A
        full-resolution model (``output_scale`` 1) is written as schema 1, which a hiseg from
        before schema 2 still reads correctly."""
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name == "tree":
                value = value.to_dict()
            elif f.name in ("mean", "std"):
                value = list(value)
            elif f.name == "decoder":
                value = dict(value)
            out[f.name] = value
        if self.output_scale == 1:
            del out["output_scale"]
            out["schema"] = 1
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, source: str = "<json>") -> ModelSpec:
        """Parse and check; :class:`ModelError` naming ``source`` for anything malformed."""
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError, TypeError) as err:
            raise ModelError(
                f"{source}: '{METADATA_KEY}' metadata is not valid JSON ({err})"
            ) from None
        return cls.from_dict(data, source)

    @classmethod
    def from_dict(cls, data: Any, source: str = "<dict>") -> ModelSpec:
        """Check a decoded spec (this schema or an older one) field by field."""
        if not isinstance(data, Mapping):
            raise ModelError(f"{source}: model spec must be a JSON object, not {_kind(data)}")
        schema = data.get("schema", 0)
        if not _is_int(schema) or schema < 0:
            raise ModelError(
                f"{source}: model spec 'schema' must be a whole number, not {schema!r}"
            )
        if schema > SCHEMA_VERSION:
            raise ModelError(
                f"{source}: model spec schema {schema} was written by a newer hiseg (this one "
                f"reads schemas up to {SCHEMA_VERSION}); upgrade hiseg"
            )
        data = _from_schema0(data, source) if schema == 0 else {**data, "schema": SCHEMA_VERSION}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ModelError(f"{source}: model spec has unknown field(s) {', '.join(unknown)}")
        missing = [f.name for f in fields(cls) if f.name not in data and f.name in _REQUIRED]
        if missing:
            raise ModelError(f"{source}: model spec lacks field(s) {', '.join(missing)}")
        values = {name: _check(name, value, source) for name, value in data.items()}
        stride, scale = values.get("output_stride", 32), values.get("output_scale", 1)
        if stride % scale:
            raise ModelError(
                f"{source}: model spec 'output_scale' {scale} must divide 'output_stride' {stride}"
            )
        try:
            values["tree"] = Tree.from_dict(values["tree"], source=f"{source}: tree")
        except TreeError as err:
            raise ModelError(str(err)) from None
        return cls(**values)


_REQUIRED = ("arch", "encoder", "tree", "mean", "std", "long_side")


def _from_schema0(data: Mapping[str, Any], source: str) -> dict[str, Any]:
    """The untyped dict of hiseg 0.1 -> this schema's fields (unchecked yet)."""
    model = data.get("model")
    if not isinstance(model, Mapping):
        raise ModelError(f"{source}: model spec (schema 0) lacks the 'model' object")
    defaults = data.get("defaults", {})
    if not isinstance(defaults, Mapping):
        raise ModelError(
            f"{source}: model spec 'defaults' must be an object, not {_kind(defaults)}"
        )
    out = {
        key: model[key]
        for key in ("arch", "encoder", "decoder", "tree", "mean", "std", "output_stride")
        if key in model
    }
    out.update({key: data[key] for key in ("long_side", "train_size", "precision") if key in data})
    if "clean" in defaults:
        out["default_clean"] = defaults["clean"]
    if "version" in data:
        out["hiseg_version"] = data["version"]
    out["schema"] = SCHEMA_VERSION
    return out


def _check(name: str, value: Any, source: str) -> Any:
    """``value`` of field ``name`` in its typed form, or a ModelError naming both."""

    def bad(expected: str) -> ModelError:
        return ModelError(f"{source}: model spec '{name}' must be {expected}, not {value!r}")

    if name in ("arch", "encoder", "hiseg_version"):
        if not isinstance(value, str) or (name != "hiseg_version" and not value):
            raise bad("a non-empty string" if name != "hiseg_version" else "a string")
        return value
    if name in ("mean", "std"):
        if (
            not isinstance(value, list | tuple)
            or len(value) != 3
            or not all(_is_number(v) for v in value)
            or (name == "std" and not all(v > 0 for v in value))
        ):
            raise bad("three numbers" + (" above 0" if name == "std" else ""))
        return tuple(float(v) for v in value)
    if name in ("long_side", "output_stride", "output_scale", "schema"):
        if not _is_int(value) or value < 1:
            raise bad("a whole number above 0")
        return value
    if name == "train_size":
        if value is not None and (not _is_int(value) or value < 1):
            raise bad("a whole number above 0 or null")
        return value
    if name == "default_clean":
        if not _is_int(value) or value < 0:
            raise bad("a whole number of pixels, 0 or more")
        return value
    if name == "precision":
        if value not in PRECISIONS:
            raise bad(" or ".join(PRECISIONS))
        return value
    if name == "decoder":
        if not isinstance(value, Mapping) or not all(isinstance(k, str) for k in value):
            raise bad("an object of keyword arguments")
        return dict(value)
    if name == "tree":
        if not isinstance(value, Mapping):
            raise bad("a tree object")
        return value
    raise AssertionError(name)  # every field is handled above


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value == value


def _kind(value: Any) -> str:
    return type(value).__name__
