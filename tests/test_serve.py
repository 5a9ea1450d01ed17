"""The HTTP API (FastAPI TestClient): every endpoint, every rejection, and the CLI's labels."""

from __future__ import annotations

import base64
import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import tifffile
import torch
from fastapi.testclient import TestClient
from PIL import Image

from pixelwise.inference import predict_files
from pixelwise.models import create_model, load_model, save_model
from pixelwise.serve import ServeLimits, create_app, load_models

CLASSES = ["sky", "road", "car"]
PALETTE = [(0, 0, 255), (128, 128, 128), (255, 0, 0)]
MEAN, STD = [0.5, 0.4, 0.3], [0.25, 0.2, 0.3]
LIMITS = ServeLimits(max_upload_mb=0.05, max_pixels=64 * 64, max_jobs=1, workers=1, timeout_s=30)


@pytest.fixture(scope="module")
def model_path(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    net = create_model("unet", num_classes=3, base_channels=4, depth=2)
    with torch.no_grad():  # decisive logits: untrained, the classes' logits are close or (dead ReLUs) tied
        net.head.weight.mul_(1000)
        net.head.bias.copy_(torch.tensor([0.2, 0.1, 0.0]))
    path = tmp_path_factory.mktemp("serve") / "street" / "model_best.safetensors"
    return save_model(net, path, extra={"class_names": CLASSES, "palette": PALETTE, "mean": MEAN, "std": STD})


@pytest.fixture
def client(model_path):
    app = create_app([model_path], LIMITS)
    with TestClient(app) as c:
        yield c


def _image(height: int = 40, width: int = 56, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _encode(array: np.ndarray, kind: str = "png") -> bytes:
    buffer = io.BytesIO()
    if kind == "tiff":
        tifffile.imwrite(buffer, array)
    else:
        Image.fromarray(array.squeeze()).save(buffer, format=kind.upper(), **({"quality": 95} if kind == "jpeg" else {}))
    return buffer.getvalue()


def _post(client, data: bytes, name: str = "street", filename: str = "a.png", mime: str = "image/png", **fields):
    return client.post(f"/v1/models/{name}/predict", files={"image": (filename, data, mime)},
                       data={k: str(v) for k, v in fields.items()})


def _labels(png: bytes) -> np.ndarray:
    return np.array(Image.open(io.BytesIO(png)))


def _cli_labels(model_path: Path, tmp_path: Path, filename: str, data: bytes, **options) -> bytes:
    """The label PNG ``pixelwise predict`` writes for the same file and options."""
    source = tmp_path / filename
    source.write_bytes(data)
    predict_files([source], model_path, tmp_path / "cli", **options)
    return (tmp_path / "cli" / f"{source.stem}_labels.png").read_bytes()


# ---------------------------------------------------------------------------------------
# Endpoints
# ---------------------------------------------------------------------------------------


def test_models_health_and_ready(client) -> None:
    body = client.get("/v1/models").json()
    (model,) = body["models"]
    assert model["name"] == "street"  # the run folder's name
    assert model["architecture"] == "unet"
    assert [(c["id"], c["name"], tuple(c["colour"])) for c in model["classes"]] == list(
        zip(range(3), CLASSES, PALETTE)
    )
    assert model["input"]["channels"] == 3
    assert model["input"]["max_pixels"] == 4096 and model["input"]["max_upload_bytes"] == 50_000
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200 and ready.json()["status"] == "ready" and ready.json()["models"] == ["street"]
    page = client.get("/")
    assert page.status_code == 200 and "<title>pixelwise</title>" in page.text
    assert client.get("/static/app.js").status_code == 200
    schema = client.get("/openapi.json").json()
    assert {"/v1/models", "/v1/models/{name}/predict", "/healthz", "/readyz"} <= set(schema["paths"])
    assert client.get("/docs").status_code == 200


@pytest.mark.parametrize("kind", ["png", "jpeg", "tiff"])
def test_label_png_equals_the_cli_prediction(client, model_path, tmp_path, kind) -> None:
    data = _encode(_image(), kind)
    response = _post(client, data, filename=f"photo.{kind}", mime=f"image/{kind}")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert 'filename="photo_labels.png"' in response.headers["content-disposition"]
    assert response.content == _cli_labels(model_path, tmp_path, f"photo.{kind}", data)


def test_labels_are_the_models_argmax(client, model_path) -> None:
    image = _image()
    labels = _labels(_post(client, _encode(image)).content)
    net, _ = load_model(model_path)
    x = (torch.from_numpy(image).float().permute(2, 0, 1)[None] / 255 - torch.tensor(MEAN)[:, None, None]) / torch.tensor(STD)[:, None, None]
    with torch.no_grad():
        logits = net.eval()(x)[0]
    top2 = logits.topk(2, dim=0).values
    clear = (top2[0] - top2[1] > 1e-4).numpy()  # away from ties that float rounding (BN folding) could flip
    assert clear.mean() > 0.99
    assert np.array_equal(labels[clear], logits.argmax(0).numpy()[clear])
    assert len(np.unique(labels)) >= 2  # a map with more than one class, so the check has teeth


def test_json_areas_and_run_length_agree_with_the_png(client) -> None:
    data = _encode(_image())
    png = _post(client, data).content
    labels = _labels(png)
    response = client.post("/v1/models/street/predict", files={"image": ("a.png", data, "image/png")},
                           headers={"Accept": "application/json"})
    assert response.status_code == 200 and response.headers["content-type"] == "application/json"
    body = response.json()
    assert (body["model"], body["height"], body["width"]) == ("street", 40, 56)
    rle = body["labels"]
    assert rle["shape"] == [40, 56] and rle["order"] == "row-major"
    decoded = np.repeat(rle["values"], rle["counts"]).reshape(40, 56)
    assert np.array_equal(decoded, labels)
    assert all(a != b for a, b in zip(rle["values"], rle["values"][1:]))  # maximal runs
    counts = [int((labels == k).sum()) for k in range(3)]
    assert [c["pixels"] for c in body["classes"]] == counts
    assert [c["fraction"] for c in body["classes"]] == pytest.approx([n / labels.size for n in counts])
    assert [c["name"] for c in body["classes"]] == CLASSES
    # The format field wins over Accept; include_png adds the same PNG.
    both = _post(client, data, format="json", include_png="true")
    assert both.json()["labels"] == rle and base64.b64decode(both.json()["label_png"]) == png
    assert _post(client, data, format="png").content == png
    ranked = client.post("/v1/models/street/predict", files={"image": ("a.png", data, "image/png")},
                         headers={"Accept": "image/png;q=0.5, application/json;q=0.9"})
    assert ranked.headers["content-type"] == "application/json"


def test_cli_options_reach_the_prediction(client, model_path, tmp_path) -> None:
    data = _encode(_image(48, 60, seed=1))
    options = {"tile": 24, "overlap": 0.5, "scales": "0.75,1", "flip": "true", "crf": "deeplab_v1"}
    response = _post(client, data, **options)
    assert response.status_code == 200, response.text
    expected = _cli_labels(model_path, tmp_path, "b.png", data, tile=24, overlap=0.5, scales=(0.75, 1.0), flip=True,
                           crf="deeplab_v1")
    assert response.content == expected
    assert response.content != _post(client, data).content  # the options changed the result


# ---------------------------------------------------------------------------------------
# Rejections
# ---------------------------------------------------------------------------------------


def test_oversize_upload_is_413_with_or_without_content_length(client) -> None:
    big = _encode(_image(200, 200))  # random pixels hardly compress: ~120 KB > 50 KB
    assert len(big) > 50_000
    response = _post(client, big)
    assert response.status_code == 413
    assert "too large" in response.json()["detail"] and "at most 0.05 MB" in response.json()["detail"]
    # A chunked body (no Content-Length) is counted as it arrives.
    boundary = "b0undary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            "Content-Type: image/png\r\n\r\n").encode() + big + f"\r\n--{boundary}--\r\n".encode()
    chunked = client.post("/v1/models/street/predict", content=iter([body[i:i + 8192] for i in range(0, len(body), 8192)]),
                          headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    assert chunked.status_code == 413 and "at most 0.05 MB" in chunked.json()["detail"]


def test_too_many_pixels_is_413_before_decoding(client) -> None:
    flat = _encode(np.zeros((100, 80, 3), np.uint8))  # 8000 px > 4096, a few hundred bytes
    response = _post(client, flat, filename="wide.png")
    assert response.status_code == 413
    assert response.json()["detail"] == (
        "image 'wide.png' is 80 x 100 = 8,000 pixels; this server takes at most 4,096 (--max-pixels)"
    )


@pytest.mark.parametrize(
    ("data", "filename", "mime", "status", "message"),
    [
        (b"hello, world", "notes.txt", "text/plain", 415, "upload 'notes.txt' is not a PNG, JPEG or TIFF image (text/plain"),
        (b"GIF89a\x01\x00\x01\x00", "anim.gif", "image/gif", 415, "is not a PNG, JPEG or TIFF image (image/gif"),
        (b"", "empty.png", "image/png", 415, "(an empty file)"),
        (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "broken.png", "image/png", 400, "cannot read image 'broken.png'"),
        (None, "cut.jpg", "image/jpeg", 400, "cannot read image file 'cut.jpg'"),
    ],
)
def test_bad_and_corrupt_uploads_name_the_problem(client, data, filename, mime, status, message) -> None:
    if data is None:  # a JPEG cut after its header: the size reads, the pixels do not
        data = _encode(_image(), "jpeg")[:700]
    response = _post(client, data, filename=filename, mime=mime)
    assert response.status_code == status
    assert message in response.json()["detail"]


def test_unknown_model_wrong_channels_and_bad_options(client) -> None:
    data = _encode(_image())
    missing = _post(client, data, name="nope")
    assert missing.status_code == 404 and missing.json()["detail"] == "unknown model 'nope'; available: street"
    grey = _post(client, _encode(_image()[:, :, 0]), filename="grey.png")
    assert grey.status_code == 400
    assert grey.json()["detail"] == "image 'grey.png' has 1 channel(s) but model 'street' takes 3"
    for fields, message in (
        ({"crf": "strong"}, "crf must be one of krahenbuhl, deeplab_v1, deeplab_v2, got 'strong'"),
        ({"scales": "1,x"}, "scales '1,x' must be comma-separated numbers"),
        ({"overlap": "1"}, "overlap must be in [0, 1), got 1.0"),
        ({"tile": "0"}, "tile must be >= 1 pixel, got 0"),
        ({"format": "xml"}, "format must be 'png' or 'json', got 'xml'"),
    ):
        response = _post(client, data, **fields)
        assert response.status_code == 400 and message in response.json()["detail"], fields


def _blocked(app, name: str = "street") -> threading.Event:
    """Make the model's predictor wait for the returned event (at most 20 s), to hold a job."""
    served = app.state.models[name]
    run, release = served.predictor, threading.Event()

    def waiting(x):
        release.wait(20)
        return run(x)

    served.predictor = waiting
    return release


def _wait_for(condition, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def test_full_queue_is_503_and_health_answers_during_inference(model_path) -> None:
    app = create_app([model_path], LIMITS)
    release = _blocked(app)
    data = _encode(_image())
    with TestClient(app) as client:
        first: dict = {}
        worker = threading.Thread(target=lambda: first.update(response=_post(client, data)))
        worker.start()
        try:
            _wait_for(lambda: app.state.queue.active == 1)
            busy = _post(client, data)
            assert busy.status_code == 503
            assert busy.json()["detail"] == "server busy: 1 of 1 inference jobs in progress; retry later"
            assert int(busy.headers["Retry-After"]) >= 1
            assert client.get("/healthz").status_code == 200  # the event loop is free
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "busy"
        finally:
            release.set()
            worker.join(20)
        assert first["response"].status_code == 200
        assert app.state.queue.active == 0 and client.get("/readyz").status_code == 200


def test_timeout_is_504_and_keeps_the_slot_until_the_job_ends(model_path) -> None:
    app = create_app([model_path], ServeLimits(max_pixels=4096, max_jobs=1, timeout_s=0.2))
    release = _blocked(app)
    data = _encode(_image())
    with TestClient(app) as client:
        try:
            response = _post(client, data)
            assert response.status_code == 504
            assert response.json()["detail"].startswith("inference took longer than 0.2 s (--timeout)")
            assert app.state.queue.active == 1  # the running job still holds its memory
            assert _post(client, data).status_code == 503
        finally:
            release.set()
        _wait_for(lambda: app.state.queue.active == 0)
        assert _post(client, data).status_code == 200


def test_model_names_and_limits_are_validated(model_path) -> None:
    served = load_models([f"city={model_path}", model_path])
    assert list(served) == ["city", "street"]
    with pytest.raises(ValueError, match="two models are named 'street'"):
        load_models([model_path, model_path])
    with pytest.raises(ValueError, match="does not exist"):
        load_models(["runs/none/model_best.safetensors"])
    with pytest.raises(ValueError, match="max_jobs must be an int >= 1, got 0"):
        ServeLimits(max_jobs=0)


@pytest.mark.parametrize("name, options, kind", [
    ("maskrcnn", {"backbone": "resnet18", "fpn_channels": 16, "representation_size": 16, "mask_channels": 16}, "Mask R-CNN"),
    ("unet3d", {"base_channels": 4}, "3D"),
])
def test_serve_refuses_instance_and_volume_models(tmp_path, name, options, kind) -> None:
    path = save_model(create_model(name, num_classes=2, **options), tmp_path / "run" / "model_best")
    with pytest.raises(ValueError, match=f"is a {kind}.*serve runs 2D semantic models: use pixelwise predict"):
        load_models([path])


def test_serve_command_binds_loopback_by_default(model_path, monkeypatch) -> None:
    import uvicorn
    from typer.testing import CliRunner

    from pixelwise.cli import app as cli

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    result = CliRunner().invoke(cli, ["serve", "--model", f"city={model_path}", "--max-jobs", "2", "--max-pixels", "1000"])
    assert result.exit_code == 0, result.output
    ((served, kwargs),) = calls
    assert (kwargs["host"], kwargs["port"]) == ("127.0.0.1", 8000)
    assert list(served.state.models) == ["city"]
    assert (served.state.limits.max_jobs, served.state.limits.max_pixels) == (2, 1000)
    bad = CliRunner().invoke(cli, ["serve", "--model", "runs/none/model_best.safetensors"])
    assert isinstance(bad.exception, ValueError) and "does not exist" in str(bad.exception)
