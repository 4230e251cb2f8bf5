"""Report data read back from JSON: non-finite numbers (written as strings) become floats again, labels do not."""
from __future__ import annotations

import json
import math

from robustness_diag.io import json_text
from robustness_diag.reports.correlate_report import numbers_back


def test_numbers_back_restores_nonfinite_numbers_but_not_labels():
    data = {"metrics": {"nan": {"roc": {"threshold": [float("inf"), 2.0, 1.0]}, "auroc": {"value": float("nan")}}},
            "per_image": [{"name": "nan", "score_mean": float("-inf")}], "title": "inf", "notes": ["nan"]}
    back = numbers_back(json.loads(json_text(data)))
    m = back["metrics"]["nan"]                                       # a model called "nan" keeps its name
    assert m["roc"]["threshold"] == [math.inf, 2.0, 1.0] and math.isnan(m["auroc"]["value"])
    assert back["per_image"][0] == {"name": "nan", "score_mean": -math.inf}
    assert back["title"] == "inf" and back["notes"] == ["nan"]
