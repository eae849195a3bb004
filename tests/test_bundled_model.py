"""The shipped models load with ONNX Runtime and give sane per-level IoU on real images.

Thresholds sit well below the measured numbers (MODEL_CARD.md), so this fails only when something
breaks (a corrupt file, wrong metadata, wrong preprocessing or decoding), not on noise.
"""

import subprocess
import sys

from hiseg.data import open_dataset
from hiseg.metrics import ConfusionMatrix
from hiseg.predictor import bundled_models, load


def test_both_models_ship_with_the_package():
    assert {"pascal-person-part", "person"} <= set(bundled_models())


def scores_on_20_images(predictor, root, split: str) -> dict:
    """Scores of ``predictor`` on 20 images spread over the split."""
    dataset = open_dataset(root, split)
    cm = ConfusionMatrix(dataset.tree)
    for sample in dataset.samples[:: len(dataset) // 20][:20]:
        image, labels = dataset.read(sample)
        cm.update(labels, predictor.predict(image).labels)
    return cm.scores()


def test_default_model_scores_sanely_on_20_val_images(pascal_root):
    predictor = load(threads=2)
    assert predictor.tree.name == "pascal-person-part"
    levels = scores_on_20_images(predictor, pascal_root, "val")["levels"]
    assert levels["0"]["miou"] > 0.65
    assert levels["1"]["miou"] > 0.45
    assert levels["2"]["miou"] > 0.30


def test_person_model_scores_sanely_on_20_valid_images(picsart_root):
    predictor = load("person", threads=2)
    assert predictor.tree.name == "person"
    assert scores_on_20_images(predictor, picsart_root, "valid")["iou"] > 0.85


def test_default_prediction_never_imports_torch(tmp_path):
    code = (
        "import sys, numpy as np, hiseg\n"
        "r = hiseg.load().predict(np.zeros((64, 48, 3), np.uint8))\n"
        "assert r.labels.shape == (64, 48)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
