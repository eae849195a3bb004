"""hiseg: hierarchical human segmentation (person, upper/lower body, six parts)."""

__version__ = "0.1.0"
