"""hiseg: hierarchical human segmentation (person, upper/lower body, six parts).

``hiseg.load(model=None)`` returns a predictor for a bundled model name, an ``.onnx`` file or a
``.ckpt`` checkpoint; ``predictor.predict(image)`` returns labels, per-level maps and an overlay.
"""

from typing import Any

__version__ = "0.1.0"
__all__ = ["__version__", "load"]


def __getattr__(name: str) -> Any:
    # Lazy, so `import hiseg` stays cheap and the CLI starts fast.
    if name == "load":
        from hiseg.predictor import load

        return load
    raise AttributeError(f"module 'hiseg' has no attribute {name!r}")
