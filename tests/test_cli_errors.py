"""Every user mistake through the real ``pixelwise`` entry point: exit code 2, one line
``error: ...`` on stderr naming the file or argument, no traceback, nothing written.

The mistakes share one tiny data set and model made once. Each runs ``pixelwise.cli.main``
(what the console script calls) in its own process, forked after one torch import
(``cli_runner``); the bare ``python -m pixelwise.cli`` start is checked separately (no
arguments, an unknown command).
"""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
from cli_runner import assert_one_error_line, run_cases, run_cli, tree

from pixelwise.data import write_synthetic_dataset
from pixelwise.io import atomic_write_text
from pixelwise.models import create_model, save_model

# (case id, arguments, text the error line must contain). In the arguments {root} is the
# fixture folder, {out} a fresh output path of the case that must still be absent afterwards.
CASES = [
    ("unknown command", ["no-such-command"], "No such command 'no-such-command'"),
    ("missing --model", ["predict", "{image}"], "'--model'"),
    ("missing images", ["predict", "--model", "{model}"], "'images'"),
    ("unknown option", ["eval", "--model", "{model}", "--data", "{data}", "--bogus"], "--bogus"),
    ("--tile abc", ["predict", "{image}", "--model", "{model}", "--out", "{out}", "--tile", "abc"], "'--tile'"),
    ("--tile 0", ["predict", "{image}", "--model", "{model}", "--out", "{out}", "--tile", "0"], "tile"),
    ("--scales abc", ["predict", "{image}", "--model", "{model}", "--out", "{out}", "--scales", "abc"], "--scales 'abc'"),
    ("--crf bogus", ["predict", "{image}", "--model", "{model}", "--out", "{out}", "--crf", "bogus"], "--crf 'bogus'"),
    ("--runtime bogus", ["predict", "{image}", "--model", "{model}", "--out", "{out}", "--runtime", "bogus"], "runtime"),
    ("--overlap 1", ["predict", "{image}", "--model", "{model}", "--out", "{out}", "--tile", "16", "--overlap", "1"], "overlap"),
    ("corrupt image", ["predict", "{root}/corrupt.png", "--model", "{model}", "--out", "{out}"], "corrupt.png"),
    ("image twice", ["predict", "{image}", "{image}", "--model", "{model}", "--out", "{out}"], "share the name '0000'"),
    ("one stem in two folders", ["predict", "{data}/train/images/0001.png", "{data}/train/masks/0001.png", "--model",
                                 "{model}", "--out", "{out}"], "share the name '0001'"),
    ("--out is a file", ["predict", "{image}", "--model", "{model}", "--out", "{root}/afile.txt"], "afile.txt"),
    ("invalid model JSON", ["predict", "{image}", "--model", "{root}/badjson.safetensors", "--out", "{out}"], "badjson.json"),
    ("JSON of another model", ["predict", "{image}", "--model", "{root}/mismatch.safetensors", "--out", "{out}"],
     "mismatch.safetensors' does not fit the model described in"),
    ("truncated weights", ["predict", "{image}", "--model", "{root}/trunc.safetensors", "--out", "{out}"], "trunc.safetensors"),
    ("3-class model, 2-class data", ["eval", "--model", "{model}", "--data", "{data2}", "--out", "{out}"],
     "trained on 3 classes (a, b, c) but"),
    ("eval --out is a file", ["eval", "--model", "{model}", "--data", "{data}", "--out", "{root}/afile.txt"], "afile.txt"),
    ("eval unknown split", ["eval", "--model", "{model}", "--data", "{data}", "--split", "nope", "--out", "{out}"], "'nope'"),
    ("binary file as YAML", ["train", "-c", "{root}/binary.yaml"], "binary.yaml"),
    ("missing YAML", ["train", "-c", "{root}/missing.yaml"], "missing.yaml"),
    ("mean=abc", ["train", "data={data}", "out={out}", "mean=abc"], "mean='abc'"),
    ("data= empty", ["train", "data=", "out={out}"], "'data'"),
    ("lr=abc", ["train", "data={data}", "out={out}", "lr=abc"], "lr='abc'"),
    ("crop_size=64", ["train", "data={data}", "out={out}", "crop_size=64"], "crop_size=64"),
    ("model_args=5", ["train", "data={data}", "out={out}", "model_args=5"], "model_args=5"),
    ("epochs=0", ["train", "data={data}", "out={out}", "epochs=0"], "epochs=0"),
    ("override without =", ["train", "data={data}", "out={out}", "epochs"], "'epochs'"),
    ("unknown model option", ["train", "data={data}", "out={out}", "model_args.bogus=1"], "bogus"),
    ("train out= is a file", ["train", "data={data}", "out={root}/afile.txt"], "afile.txt"),
    ("val_fraction=2", ["train", "data={plain}", "out={out}", "val_fraction=2"], "val_fraction=2"),
    ("demo --epochs 0", ["demo", "--epochs", "0", "--out", "{out}"], "epochs=0"),
    ("demo --images 2", ["demo", "--images", "2", "--out", "{out}"], "--images 2"),
    ("export --out is a folder", ["export", "--model", "{model}", "--out", "{root}"], "is a folder"),
    ("export --format", ["export", "--model", "{model}", "--out", "{out}", "--format", "tflite"], "--format 'tflite'"),
    ("unwritable --out", ["export", "--model", "{model}", "--out", "/proc/model.onnx"], "/proc/model.onnx: cannot write"),
    ("check-data missing folder", ["check-data", "{root}/nowhere"], "nowhere"),
]


@pytest.fixture(scope="module")
def fixture_root(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("mistakes")
    data = write_synthetic_dataset(root / "data", n_train=2, n_val=1, size=(32, 32))
    data2 = write_synthetic_dataset(root / "data2", n_train=1, n_val=1, size=(32, 32), num_classes=2)
    model = create_model("unet", num_classes=3, base_channels=4, depth=2)
    weights = save_model(model, root / "m3", {"class_names": ["a", "b", "c"], "palette": [[0, 0, 0]] * 3})
    for name in ("badjson", "mismatch", "trunc"):
        shutil.copy(weights, root / f"{name}.safetensors")
        shutil.copy(weights.with_suffix(".json"), root / f"{name}.json")
    (root / "badjson.json").write_text('{"model": {"name": "unet",')  # cut short
    meta = json.loads((root / "mismatch.json").read_text())
    meta["model"]["num_classes"] = 5
    (root / "mismatch.json").write_text(json.dumps(meta))
    blob = weights.read_bytes()
    (root / "trunc.safetensors").write_bytes(blob[: len(blob) // 2])
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (root / "afile.txt").write_text("keep me\n")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    plain = root / "plain"
    shutil.copytree(data / "train", plain)
    return {"root": root, "data": data, "data2": data2, "model": weights, "plain": plain,
            "image": data / "val" / "images" / "0000.png"}


@pytest.fixture(scope="module")
def results(fixture_root, tmp_path_factory) -> dict:
    """Run every case once, in parallel; also snapshot the fixture folder around the runs."""
    before = tree(fixture_root["root"])
    ran = run_cases(CASES, fixture_root, tmp_path_factory.mktemp("outs"))
    return {"ran": ran, "before": before, "after": tree(fixture_root["root"])}


@pytest.mark.parametrize(("name", "args", "expected"), CASES, ids=[c[0] for c in CASES])
def test_mistake_is_one_error_line_with_exit_code_2_and_writes_nothing(results, name, args, expected) -> None:
    proc, out = results["ran"][name]
    assert_one_error_line(proc, expected, out)


def test_mistakes_leave_the_inputs_untouched(results) -> None:
    assert results["after"] == results["before"]


def test_module_entry_point_help_and_unknown_command() -> None:
    proc = run_cli()
    assert proc.returncode == 0 and "Usage: pixelwise" in proc.stdout and proc.stderr == ""
    proc = run_cli("no-such-command")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr == "error: No such command 'no-such-command'; see 'pixelwise --help'\n"


def test_predict_writes_each_image_once_with_usual_permissions(fixture_root, tmp_path) -> None:
    images = [fixture_root["data"] / "train" / "images" / f"{i:04d}.png" for i in (0, 1)]
    out = tmp_path / "out"
    proc = run_cli("predict", *map(str, images), "--model", str(fixture_root["model"]), "--out", str(out), umask=0o022)
    assert proc.returncode == 0, proc.stderr
    assert "wrote 2 predictions" in proc.stdout
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(f"{i:04d}_{k}.png" for i in (0, 1) for k in ("labels", "colour", "overlay"))
    assert {oct(p.stat().st_mode & 0o777) for p in out.iterdir()} == {oct(0o644)}


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o077, 0o600)])
def test_atomic_writes_follow_the_umask(tmp_path, umask, mode) -> None:
    old = os.umask(umask)
    try:
        path = atomic_write_text(tmp_path / "sub" / "f.txt", "x")
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode
    assert [p.name for p in path.parent.iterdir()] == ["f.txt"]  # no temp file left


def test_demo_trains_and_reports_through_the_entry_point(tmp_path) -> None:
    out = tmp_path / "demo"
    proc = run_cli("demo", "--epochs", "1", "--images", "4", "--out", str(out))
    assert proc.returncode == 0, proc.stderr
    assert "validation mIoU" in proc.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    history = json.loads((out / "history.json").read_text())
    assert [h["epoch"] for h in history] == [1] and np.isfinite(history[0]["train_loss"])
    assert len(metrics["per_class"]) == 4  # background + 3 shapes of the synthetic set
    assert 0.0 <= metrics["pixel_accuracy"] <= 1.0 and 0.0 <= metrics["mean_iou"] <= 1.0
    for name in ("model_best.safetensors", "model_best.json", "history.png", "confusion.png", "overlays.png",
                 "metrics.txt", "checkpoint.safetensors"):
        assert (out / name).stat().st_size > 0, name
    assert len(list((out / "data" / "train" / "images").iterdir())) == 4
    assert len(list((out / "data" / "val" / "images").iterdir())) == 1
