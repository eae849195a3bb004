"""hiseg: hierarchical human segmentation (person, upper/lower body, six parts).

``hiseg.load(model=None)`` returns a predictor for a bundled model name, an ``.onnx`` file or a
``.ckpt`` checkpoint; ``predictor.predict(image)`` returns labels, per-level maps and an overlay.
``hiseg.bundled_models()`` lists the names that need no file.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["Result", "__version__", "bundled_models", "load"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import hiseg` stays cheap and the CLI starts fast.
    if name in ("load", "Result", "bundled_models"):
        from hiseg import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'hiseg' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)  # tab completion shows the lazy names too
