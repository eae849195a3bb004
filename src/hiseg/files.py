"""Writing outputs safely: a folder checked writable before any work starts, and files that
readers see whole or not at all (written to a hidden temporary name, then renamed).

Every module that writes results (runner, evaluation, report, export, training, pseudo-labels,
bench, data statistics) goes through these, so none of them can leave a truncated file.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from hiseg.errors import HisegError


class OutputError(HisegError):
    """The output location cannot be used; found before any work starts."""


def _probe_writable(folder: Path, option: str) -> None:
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".hiseg-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        raise OutputError(f"{option} {folder}: cannot write there ({err.strerror})") from None


def writable_folder(folder: Path, option: str = "--out") -> Path:
    """``folder``, created if needed, once a file was written and removed in it; else a clear
    :class:`OutputError` naming the option, so a bad location fails before any work starts."""
    if folder.exists() and not folder.is_dir():
        raise OutputError(f"{option} {folder}: is a file, not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise OutputError(f"{option} {folder}: cannot create the folder ({err.strerror})") from None
    _probe_writable(folder, option)
    return folder


def writable_file(path: Path, option: str) -> Path:
    """``path`` once its folder is known writable and it is not itself a folder."""
    if path.is_dir():
        raise OutputError(f"{option} {path}: is a folder, not a file")
    if path.parent.exists() and not path.parent.is_dir():
        raise OutputError(f"{option} {path}: {path.parent} is a file, not a folder")
    writable_folder(path.parent, option)
    return path


def publish(path: Path, write: Callable[[Path], Any]) -> Any:
    """``write(temporary)`` then rename onto ``path``: readers see the whole file or none. The
    temporary name is hidden (leading dot), keeps the suffix (writers pick formats by it) and
    is removed if anything fails."""
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp{path.suffix}")
    try:
        value = write(tmp)
        os.replace(tmp, path)
    finally:
        unlink_all([tmp])
    return value


def png_writer(array: np.ndarray) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        Image.fromarray(array).save(tmp, "PNG")

    return write


def json_writer(data: Any) -> Callable[[Path], None]:
    def write(tmp: Path) -> None:
        tmp.write_text(json.dumps(data, indent=2))

    return write


def unlink_all(paths: list[Path]) -> None:
    for path in paths:
        path.unlink(missing_ok=True)
