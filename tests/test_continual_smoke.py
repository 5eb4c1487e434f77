"""Smoke test of the continual-finetuning experiment (experiments/continual.py), tiny settings.

Runs LoRA-Muon-OGD end to end on the quick task sequence (three tasks, OGD bases
appended between them) and checks that the run is finite, that the bases constrain
task 2 and 3 (a nonzero residual is reported once they exist) and that a stored
piece is skipped on a second call (resumability).
"""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

_SCRIPT = Path(__file__).resolve().parent.parent / "experiments" / "continual.py"


def _module():
    spec = importlib.util.spec_from_file_location("continual_experiment", _SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["continual_experiment"] = module
    spec.loader.exec_module(module)
    return module


def test_quick_ogd_run_is_finite_and_resumable(tmp_path: Path) -> None:
    c = _module()
    cfg = c.QUICK
    path = c._run_path(tmp_path, "tune", "lora_muon_ogd", (0.05, 0.5), 0)
    result = c._cached(path, lambda: c.run("lora_muon_ogd", 0.05, 0, cfg, 0.5))
    mat = result["matrix"]
    assert len(mat) == cfg.tasks and all(len(row) == cfg.tasks for row in mat)
    assert all(math.isfinite(x) for row in mat for x in row)
    # Task 1 is learnt (its loss falls below the base model's) ...
    assert mat[0][0] < result["pre"][0]
    # ... no bases exist during task 1 (residual 0), they do afterwards.
    assert result["residual_end"][0] == 0.0 and result["residual_end"][1] > 0.0
    m = c.metrics(result)
    assert set(m) >= {"final_avg", "forgetting", "plasticity"}
    # A stored piece is read back, not recomputed.
    json.loads(path.read_text())
    again = c._cached(path, lambda: (_ for _ in ()).throw(AssertionError("recomputed")))
    assert again == result
