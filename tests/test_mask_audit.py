"""benchmarks/train_mask_audit.py: the folds and the blob measure the model card relies on."""

from __future__ import annotations

import importlib.util

import numpy as np
from conftest import ROOT

from hiseg.data import open_dataset, read_id_list

spec = importlib.util.spec_from_file_location("audit", ROOT / "benchmarks" / "train_mask_audit.py")
audit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(audit)


def test_a_loose_outline_is_no_blob_but_a_labelled_patch_is():
    region = np.zeros((100, 100), bool)
    region[10:90, 10 : 10 + audit.BAND - 2] = True  # a band along an outline, narrower than BAND
    assert audit.largest_blob(region) == 0
    region[50:70, 50:80] = True  # a 20 x 30 patch of background labelled person
    assert audit.largest_blob(region) == 600


def test_folds_split_the_train_ids_once_each(tiny_data, tmp_path):
    audit.write_folds(tiny_data, "train", 2, tmp_path)
    folds = [read_id_list(tmp_path / f"fold{i}.txt") for i in range(2)]
    assert sorted(folds[0] + folds[1]) == sorted(open_dataset(tiny_data, "train").ids)
    assert not set(folds[0]) & set(folds[1]) and abs(len(folds[0]) - len(folds[1])) <= 1
    audit.write_folds(tiny_data, "train", 2, tmp_path / "again")
    assert read_id_list(tmp_path / "again" / "fold0.txt") == folds[0]  # the same split each time
