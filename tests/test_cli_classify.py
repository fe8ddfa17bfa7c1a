"""`cytoedge classify` / `evaluate` / `--help` end to end, through the real CLI, on real image files."""
from __future__ import annotations

import json
import subprocess
import sys

import cv2
import numpy as np
import pytest

from edge.cli import COMMANDS, main
from smear import Wbc, render_smear


def _write_cells(folder, n=3, cls="neutrophil"):
    (folder / cls).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = render_smear([Wbc(80, 80, kind="lobed" if i % 2 else "round")], h=160, w=160, px_per_um=3.0,
                           n_rbc=10, n_platelets=0, seed=i)
        cv2.imwrite(str(folder / cls / f"cell{i}.png"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return folder


def test_every_command_has_help():
    for name in COMMANDS:
        res = subprocess.run([sys.executable, "-m", "edge.cli", name, "--help"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, (name, res.stderr)
        assert len(res.stdout) > 200 and "usage: cytoedge " + name in res.stdout


def test_classify_engine_jsonl_and_bad_images(tiny_bundle, tmp_path, capsys):
    data = _write_cells(tmp_path / "cells")
    (data / "neutrophil" / "empty.jpg").write_bytes(b"")
    (data / "neutrophil" / "text.png").write_bytes(b"hello, not an image")
    out = tmp_path / "pred.jsonl"
    rc = main(["classify", "--bundle", str(tiny_bundle), "--out", str(out), str(data)])
    assert rc == 1  # two images failed, the others were classified
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(rows) == 5
    errors = {r["path"].rsplit("/", 1)[1]: r["error"] for r in rows if "error" in r}
    assert set(errors) == {"empty.jpg", "text.png"} and "empty file" in errors["empty.jpg"]
    good = [r for r in rows if "error" not in r]
    classes = json.loads((tiny_bundle / "manifest.json").read_text())["classes"]
    for r in good:
        assert r["label"] in classes and set(r["probs"]) == set(classes)
        assert abs(sum(r["probs"].values()) - 1) < 1e-3
        assert r["state"] in ("accepted", "review", "abnormal") and r["evals"] == 16
        assert isinstance(r["anomaly"], float) and r["cell_found"] is True
    assert "could not be read" in capsys.readouterr().err


def test_evaluate_report(tmp_path, capsys):
    data = _write_cells(tmp_path / "cells", n=2)
    _write_cells(tmp_path / "cells", n=2, cls="lymphocyte")
    preds = [{"path": str(p), "label": "neutrophil", "probs": {}, "state": "review", "anomaly": 0.0, "evals": 16}
             for p in sorted(data.rglob("*.png"))]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in preds))
    assert main(["evaluate", str(tmp_path / "p.jsonl"), "--data", str(data), "--out", str(tmp_path / "rep")]) == 0
    text = capsys.readouterr().out
    assert "accuracy: 50.00%" in text and "balanced accuracy: 50.00%" in text
    rep = json.loads((tmp_path / "rep" / "report.json").read_text())
    assert rep["confusion"] == [[0, 2], [0, 2]] and (tmp_path / "rep" / "confusion.png").stat().st_size > 1000


@pytest.mark.parametrize("argv, message", [
    (["classify", "--bundle", "/nonexistent/bundle", "x.png"], "bundle folder not found"),
    (["classify", "/nonexistent/image.png"], "no such file"),
    (["evaluate", "/nonexistent.jsonl", "--data", "."], "predictions file not found"),
])
def test_expected_errors_are_one_line_no_traceback(argv, message, tmp_path):
    (tmp_path / "x.png").write_bytes(b"inputs are listed before the bundle is opened")
    res = subprocess.run([sys.executable, "-m", "edge.cli", *argv], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert res.returncode == 2
    assert message in res.stderr and "Traceback" not in res.stderr
    assert len(res.stderr.strip().splitlines()) == 1


def test_train_refuses_bad_folders(tmp_path):
    (tmp_path / "one" / "neutrophil").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "one" / "neutrophil" / "a.png"), np.full((20, 20, 3), 200, np.uint8))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    (tmp_path / "empty" / "b").mkdir(parents=True)
    for folder, message in (("one", "need at least 2"), ("empty", "empty class folder")):
        res = subprocess.run([sys.executable, "-m", "edge.cli", "train", "--data", str(tmp_path / folder),
                              "--cache", str(tmp_path / f"{folder}.npz"), "--run-dir", str(tmp_path / "run")],
                             capture_output=True, text=True, timeout=120)
        assert res.returncode == 2 and message in res.stderr and "Traceback" not in res.stderr
