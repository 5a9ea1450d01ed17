"""Run artefacts: colour masks, overlays, training curves, confusion matrices, metric tables.

Every file is written atomically (a crash leaves the old file or none). Plots use
matplotlib's object API on an Agg canvas, so no global backend is touched and no display
is needed.

Example:
    >>> from pixelwise.report import format_metrics, write_metrics_json
    >>> print(format_metrics(metrics))
    >>> write_metrics_json("runs/demo/metrics.json", metrics)
"""

from __future__ import annotations

import io
import json
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from rich.table import Table

from pixelwise.io import atomic_write, atomic_write_text

MISSING = "—"
SUMMARY_KEYS = [
    ("pixel_accuracy", "pixel accuracy"),
    ("class_accuracy", "class accuracy"),
    ("mean_iou", "mean IoU"),
    ("fw_iou", "frequency-weighted IoU"),
    ("mean_dice", "mean Dice"),
]


def _palette_array(palette: Sequence[Sequence[int]]) -> np.ndarray:
    arr = np.asarray(palette, dtype=np.int64).reshape(-1, 3) if len(palette) else np.zeros((0, 3), np.int64)
    if arr.size and (arr.min() < 0 or arr.max() > 255):
        raise ValueError(f"palette colours must be RGB triples in 0..255, got values {arr.min()}..{arr.max()}")
    return arr.astype(np.uint8)


def colorize(labels: np.ndarray, palette: Sequence[Sequence[int]]) -> np.ndarray:
    """Colour a label map: class id k -> ``palette[k]``; any other value (ignore) -> black.

    Args:
        labels: (H, W) integer class ids.
        palette: K RGB colours.

    Returns:
        (H, W, 3) uint8 image.
    """
    labels = np.asarray(labels)
    if labels.ndim != 2:
        raise ValueError(f"labels must be an (H, W) label map, got shape {labels.shape}")
    colours = _palette_array(palette)
    out = np.zeros(labels.shape + (3,), np.uint8)
    known = (labels >= 0) & (labels < len(colours))
    out[known] = colours[labels[known].astype(np.int64)]
    return out


def _as_rgb_uint8(image: np.ndarray) -> np.ndarray:
    """(H, W), (H, W, 1) or (H, W, 3) image (uint8, uint16, or float in [0, 1]) -> (H, W, 3) uint8."""
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[:, :, None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ValueError(f"image must be (H, W), (H, W, 1) or (H, W, 3), got shape {image.shape}")
    if image.dtype == np.uint16:
        image = (image.astype(np.float64) / 257.0).round().astype(np.uint8)
    elif np.issubdtype(image.dtype, np.floating):
        image = (np.clip(image, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    elif image.dtype != np.uint8:
        raise ValueError(f"image dtype {image.dtype} is not supported; use uint8, uint16 or float in [0, 1]")
    return np.repeat(image, 3, axis=2) if image.shape[-1] == 1 else image


def overlay(
    image: np.ndarray, labels: np.ndarray, palette: Sequence[Sequence[int]], alpha: float = 0.5
) -> np.ndarray:
    """Blend class colours over an image: ``(1 - alpha) * image + alpha * colour`` (rounded).

    Pixels whose label is not a class id (ignore) keep the image unchanged.

    Args:
        image: (H, W, 3) or (H, W, 1) uint8 (uint16 and float in [0, 1] are converted).
        labels: (H, W) integer class ids.
        palette: K RGB colours.
        alpha: Colour weight in [0, 1].

    Returns:
        (H, W, 3) uint8 image.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    rgb = _as_rgb_uint8(image)
    labels = np.asarray(labels)
    if labels.shape != rgb.shape[:2]:
        raise ValueError(f"labels {labels.shape} and image {rgb.shape[:2]} must have the same (H, W)")
    colours = colorize(labels, palette).astype(np.float64)
    blended = np.round((1.0 - alpha) * rgb + alpha * colours).astype(np.uint8)
    known = (labels >= 0) & (labels < len(palette))
    return np.where(known[..., None], blended, rgb)


def _save_png(path: str | Path, rgb: np.ndarray) -> Path:
    image = Image.fromarray(rgb)
    return atomic_write(path, lambda tmp: image.save(tmp, format="PNG"))


def save_overlay_grid(
    path: str | Path,
    images: Sequence[np.ndarray],
    labels_true: Sequence[np.ndarray],
    labels_pred: Sequence[np.ndarray],
    palette: Sequence[Sequence[int]],
    alpha: float = 0.5,
    gap: int = 4,
) -> Path:
    """Write a PNG with one row per sample: image | ground-truth overlay | prediction overlay.

    Rows of different sizes are left-aligned on a black canvas; ``gap`` white pixels separate
    the panels, so the canvas is ``3 * max_w + 2 * gap`` wide and ``sum(h) + (n - 1) * gap`` high.

    Args:
        path: Output ``.png``.
        images: N images (H, W, 3 or 1), uint8 (or uint16 / float in [0, 1]).
        labels_true: N (H, W) ground-truth label maps.
        labels_pred: N (H, W) predicted label maps.
        palette: K RGB colours.
        alpha: Overlay colour weight.
        gap: Separator width in pixels.

    Returns:
        The written path.
    """
    if not (len(images) == len(labels_true) == len(labels_pred)) or len(images) == 0:
        raise ValueError(
            f"need the same positive number of images, true and predicted label maps, got "
            f"{len(images)}, {len(labels_true)} and {len(labels_pred)}"
        )
    rows = [
        [_as_rgb_uint8(img), overlay(img, t, palette, alpha), overlay(img, p, palette, alpha)]
        for img, t, p in zip(images, labels_true, labels_pred)
    ]
    max_w = max(r[0].shape[1] for r in rows)
    height = sum(r[0].shape[0] for r in rows) + gap * (len(rows) - 1)
    canvas = np.zeros((height, 3 * max_w + 2 * gap, 3), np.uint8)
    y = 0
    for row in rows:
        h, w = row[0].shape[:2]
        for j, panel in enumerate(row):
            x = j * (max_w + gap)
            canvas[y : y + h, x : x + w] = panel
            if j < 2:
                canvas[y : y + h, x + max_w : x + max_w + gap] = 255
        if y + h < height:
            canvas[y + h : y + h + gap] = 255
        y += h + gap
    return _save_png(path, canvas)


def _save_figure(path: str | Path, fig: Any) -> Path:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    data = buffer.getvalue()
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def _finite(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def plot_history(path: str | Path, history: Sequence[Mapping[str, Any]], dpi: int = 100) -> Path:
    """Write a PNG with training loss (and validation loss, if present) and the validation score per epoch.

    The score is "val_mean_iou" (semantic task) or "val_ods_f" (edge task), as the trainer
    records them.

    Entries missing a key (or holding NaN/None) are skipped; an entry without "epoch" uses
    its position (1-based). The figure is 10 x 4 inches at ``dpi``.

    Args:
        path: Output ``.png``.
        history: One dict per epoch with keys like "epoch", "train_loss", "val_loss", "val_mean_iou".
        dpi: Resolution.

    Returns:
        The written path.
    """
    from matplotlib.figure import Figure

    def series(key: str) -> tuple[list[float], list[float]]:
        pairs = [(float(h.get("epoch", i + 1)), float(h[key])) for i, h in enumerate(history) if _finite(h.get(key))]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    fig = Figure(figsize=(10, 4), dpi=dpi)
    ax_loss, ax_iou = fig.subplots(1, 2)
    for key, label in (("train_loss", "train loss"), ("val_loss", "validation loss")):
        x, y = series(key)
        if x:
            ax_loss.plot(x, y, marker="o", markersize=3, label=label)
    score = "val_ods_f" if any(_finite(h.get("val_ods_f")) for h in history) else "val_mean_iou"
    score_name = "ODS F" if score == "val_ods_f" else "mIoU"
    x, y = series(score)
    if x:
        ax_iou.plot(x, y, marker="o", markersize=3, color="tab:green", label=f"validation {score_name}")
        best = int(np.argmax(y))
        ax_iou.annotate(f"best {y[best]:.3f}", (x[best], y[best]), textcoords="offset points", xytext=(0, 6),
                        ha="center")
    for ax, title, ylabel in ((ax_loss, "Loss", "loss"), (ax_iou, f"Validation {score_name}", score_name)):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
        else:
            ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, color="grey")
    fig.tight_layout()
    return _save_figure(path, fig)


def plot_confusion(path: str | Path, cm: Any, class_names: Sequence[str], dpi: int = 100) -> Path:
    """Write a PNG of the row-normalised confusion matrix (rows = true class, columns = predicted).

    Each row is divided by its total, so the diagonal is per-class recall; rows of classes
    absent from the ground truth stay blank. Cells are annotated when K <= 25.

    Args:
        path: Output ``.png``.
        cm: (K, K) counts (numpy array or tensor).
        class_names: K names.
        dpi: Resolution.

    Returns:
        The written path.
    """
    from matplotlib.figure import Figure

    m = np.asarray(cm.detach().cpu() if hasattr(cm, "detach") else cm, dtype=np.float64)
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] != len(class_names):
        raise ValueError(
            f"cm must be (K, K) with K = len(class_names) = {len(class_names)}, got shape {m.shape}"
        )
    k = m.shape[0]
    totals = m.sum(1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(totals > 0, m / totals, np.nan)
    side = min(4 + 0.45 * k, 30)
    fig = Figure(figsize=(side + 1.5, side), dpi=dpi)
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    ax.set_xticks(range(k), labels=list(class_names), rotation=90)
    ax.set_yticks(range(k), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Confusion matrix (row-normalised)")
    if k <= 25:
        for i in range(k):
            for j in range(k):
                if not np.isnan(norm[i, j]):
                    ax.text(j, i, f"{norm[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if norm[i, j] > 0.5 else "black")
    fig.tight_layout()
    return _save_figure(path, fig)


def _pct(value: Any) -> str:
    """A fraction as a percentage with two decimals; NaN/None -> "—"."""
    return f"{100.0 * float(value):.2f}" if _finite(value) else MISSING


def per_class_table(metrics: Mapping[str, Any]) -> Table:
    """A rich table of per-class IoU / accuracy / Dice (percent) and pixels.

    A last "mean" row holds mean IoU, class accuracy (mean recall) and mean Dice; the caption
    gives pixel accuracy and frequency-weighted IoU, and the segment measures of
    :class:`pixelwise.metrics.SegmentScore` when present.

    Args:
        metrics: Dict from :func:`pixelwise.metrics.metrics_from_confusion`.

    Returns:
        ``rich.table.Table``; NaN entries (class absent) show "—".
    """
    table = Table(title="Per-class results (%)")
    table.add_column("id", justify="right")
    table.add_column("class")
    for name in ("IoU", "accuracy", "Dice", "pixels"):
        table.add_column(name, justify="right")
    rows = metrics.get("per_class", [])
    for i, row in enumerate(rows):
        pixels = row.get("pixels")
        table.add_row(
            str(i),
            str(row.get("name", f"class_{i}")),
            _pct(row.get("iou")),
            _pct(row.get("accuracy")),
            _pct(row.get("dice")),
            f"{int(pixels):,}" if _finite(pixels) else MISSING,
        )
    table.add_section()
    total = sum(int(r["pixels"]) for r in rows if _finite(r.get("pixels")))
    table.add_row(
        "", "mean", _pct(metrics.get("mean_iou")), _pct(metrics.get("class_accuracy")),
        _pct(metrics.get("mean_dice")), f"{total:,}", style="bold",
    )
    table.caption = (
        f"pixel accuracy {_pct(metrics.get('pixel_accuracy'))}   "
        f"frequency-weighted IoU {_pct(metrics.get('fw_iou'))}"
    )
    if "rand_error" in metrics:
        table.caption += (
            f"\nRand error {metrics['rand_error']:.4f}   VI {metrics['variation_of_information']:.4f}   "
            f"pixel error {metrics['pixel_error']:.4f}"
        )
    return table


def format_metrics(metrics: Mapping[str, Any]) -> str:
    """Plain-text report: the summary metrics (percent), other scalars, then the per-class table.

    Args:
        metrics: Dict from :func:`pixelwise.metrics.metrics_from_confusion` (extra scalar keys
            are listed too).

    Returns:
        Multi-line text; NaN entries show "—".
    """
    lines = []
    labels = dict(SUMMARY_KEYS)
    scalars = [k for k, _ in SUMMARY_KEYS if k in metrics]
    scalars += [k for k, v in metrics.items() if k not in labels and k != "per_class" and isinstance(v, numbers.Real)]
    width = max([len(labels.get(k, k)) for k in scalars], default=0)
    for key in scalars:
        value = metrics[key]
        text = _pct(value) if key in labels else (f"{value:.4f}" if _finite(value) else MISSING)
        lines.append(f"{labels.get(key, key):<{width}}  {text}")
    rows = metrics.get("per_class", [])
    if rows:
        name_w = max(len("class"), *(len(str(r.get("name", ""))) for r in rows))
        lines += ["", f"{'id':>3}  {'class':<{name_w}}  {'IoU':>7}  {'acc':>7}  {'Dice':>7}  {'pixels':>13}"]
        for i, r in enumerate(rows):
            pixels = r.get("pixels")
            lines.append(
                f"{i:>3}  {str(r.get('name', f'class_{i}')):<{name_w}}  {_pct(r.get('iou')):>7}  "
                f"{_pct(r.get('accuracy')):>7}  {_pct(r.get('dice')):>7}  "
                f"{(f'{int(pixels):,}' if _finite(pixels) else MISSING):>13}"
            )
    return "\n".join(lines)


def _json_ready(value: Any) -> Any:
    """Plain JSON types: NaN/inf -> None, numpy/torch scalars and arrays -> Python numbers/lists."""
    if isinstance(value, Mapping):
        return {str(k): _json_ready(v) for k, v in value.items()}
    if hasattr(value, "detach"):  # torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return _json_ready(value.tolist())
    if isinstance(value, (list, tuple)):
        return [_json_ready(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, Path):
        return str(value)
    return value


def write_metrics_json(path: str | Path, metrics: Mapping[str, Any]) -> Path:
    """Write ``metrics`` as indented JSON, atomically; NaN and infinities become ``null``.

    Args:
        path: Output ``.json``.
        metrics: Any nest of dicts/lists of numbers and strings (numpy and torch values allowed).

    Returns:
        The written path.
    """
    text = json.dumps(_json_ready(metrics), indent=2, allow_nan=False)
    return atomic_write_text(path, text + "\n")


def write_eval_report(
    out: str | Path, result: Any, class_names: Sequence[str], palette: Sequence[Sequence[int]]
) -> dict[str, Any]:
    """Write the artefacts of an evaluation into ``out`` and return its metrics.

    Files: ``metrics.json`` (NaN -> null), ``metrics.txt`` (:func:`format_metrics`),
    ``confusion.png`` when ``result.confusion`` is set, ``overlays.png`` when
    ``result.samples`` holds (image, true labels, predicted labels) triples.

    Args:
        out: Output folder (created if needed).
        result: An :class:`pixelwise.evaluation.EvalResult` (``metrics``, ``confusion``, ``samples``).
        class_names: K class names for the confusion matrix.
        palette: K RGB colours for the overlays.

    Returns:
        ``result.metrics``.
    """
    out = Path(out)
    metrics = dict(result.metrics)
    write_metrics_json(out / "metrics.json", metrics)
    atomic_write_text(out / "metrics.txt", format_metrics(metrics) + "\n")
    if getattr(result, "confusion", None) is not None:
        plot_confusion(out / "confusion.png", result.confusion, class_names)
    samples = getattr(result, "samples", None) or []
    if samples:
        images, truth, pred = zip(*samples)
        save_overlay_grid(out / "overlays.png", images, truth, pred, palette)
    return metrics
