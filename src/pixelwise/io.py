"""File helpers shared across the package: atomic writes, image and label-map reading."""

from __future__ import annotations

import io
import os
import shutil
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import cv2
import numpy as np
from PIL import Image


def _temp_path(path: Path, make: Callable[[Path], None]) -> Path:
    """Create a fresh ``.NAME.<random>.tmp`` beside ``path`` with ``make`` (which must fail if it exists)."""
    while True:
        tmp = path.parent / f".{path.name}.{uuid.uuid4().hex[:12]}.tmp"
        try:
            make(tmp)
            return tmp
        except FileExistsError:
            continue


def atomic_write(path: str | Path, write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp_path)`` on a temporary file beside ``path``, then rename it over ``path``.

    A crash or kill mid-write leaves the old file (or none), never a half-written one. The
    file gets the usual permissions (0666 minus the umask, e.g. 0644), unlike ``mkstemp``'s 0600.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = _temp_path(path, lambda p: os.close(os.open(p, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)))
    except OSError as e:
        raise OSError(e.errno, f"cannot write there ({e.strerror})", str(path)) from e
    try:
        write(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


@contextmanager
def atomic_folder(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder beside ``path`` to fill; when the block ends without
    an error it is renamed to ``path`` (which must be absent or empty), else removed, so
    ``path`` ends up complete or untouched. Usual permissions (0777 minus the umask)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _temp_path(path, lambda p: p.mkdir(mode=0o777))
    try:
        yield tmp
        if path.exists():
            path.rmdir()
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_output_folder(path: str | Path, option: str = "--out") -> Path:
    """Refuse an output folder that exists as a file, or lies below one (call before writing anything).

    ``option`` names the setting in the message: ``--out`` (a CLI option) or ``out`` (a config key).
    """
    path = Path(path)
    given = f"{option} {path}" if option.startswith("-") else f"{option}={path}"
    blocking = next((p for p in (path, *path.parents) if p.exists()), None)
    if blocking is not None and not blocking.is_dir():
        where = "is an existing file" if blocking == path else f"lies below the file {blocking}"
        raise ValueError(f"{given} {where}, not a folder; pick another output folder")
    return path


def remove_stale_temp_files(folder: str | Path) -> list[Path]:
    """Delete the ``.NAME.<random>.tmp`` files and folders that :func:`atomic_write` and
    :func:`atomic_folder` left in ``folder`` when killed mid-write; returns them.

    Only call it when no other writer is active in ``folder`` (e.g. when a run resumes).
    """
    stale = sorted(Path(folder).glob(".*.tmp"))
    for path in stale:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return stale


def atomic_write_text(path: str | Path, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


# ---------------------------------------------------------------------------
# Images and label maps
# ---------------------------------------------------------------------------

_TIFF_SUFFIXES = {".tif", ".tiff"}
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _is_16bit_colour_png(path: Path) -> bool:
    """True for a PNG whose IHDR says 16-bit RGB or RGBA (Pillow would truncate it to 8 bits)."""
    with open(path, "rb") as f:
        head = f.read(26)
    return len(head) == 26 and head[:8] == _PNG_SIGNATURE and head[24] == 16 and head[25] in (2, 6)


def _read_tiff(path: Path) -> np.ndarray:
    import tifffile

    try:
        array = tifffile.imread(path)
    except Exception as e:  # tifffile raises many types for damaged files
        raise ValueError(f"cannot read image file {path}: {e}") from e
    if array.ndim == 3 and array.shape[-1] not in (1, 3, 4) and array.shape[0] in (1, 3, 4):
        array = np.moveaxis(array, 0, -1)  # planar (C, H, W) storage
    return array


def _read_pillow(path: Path) -> Image.Image:
    try:
        image = Image.open(path)
        image.load()
    except (OSError, SyntaxError, ValueError) as e:
        raise ValueError(f"cannot read image file {path}: {e}") from e
    return image


def _as_uint(array: np.ndarray, path: Path) -> np.ndarray:
    """Cast an integer array to uint8/uint16, refusing values that do not fit."""
    if array.dtype in (np.uint8, np.uint16):
        return array
    if array.dtype == bool:
        return array.astype(np.uint8) * 255
    if np.issubdtype(array.dtype, np.integer) and array.size and 0 <= array.min() and array.max() <= 65535:
        return array.astype(np.uint8 if array.max() <= 255 else np.uint16)
    raise ValueError(
        f"image file {path} has pixel type {array.dtype}; only 8- and 16-bit unsigned images are "
        "supported: convert it to 8/16-bit PNG or TIFF"
    )


def read_image(path: str | Path) -> np.ndarray:
    """Read an image file as an (H, W, C) array.

    PNG, JPEG, BMP and TIFF (through tifffile for ``.tif``/``.tiff``), 8 or 16 bits per channel.
    RGBA drops its alpha channel, palette and other colour modes become RGB.

    Args:
        path: Image file.

    Returns:
        (H, W, C) uint8 or uint16 array with C = 1 (grey) or 3 (RGB).

    Raises:
        ValueError: The file is missing, unreadable or has an unsupported pixel layout.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"image file {path} does not exist")
    if path.suffix.lower() in _TIFF_SUFFIXES:
        array = _read_tiff(path)
    elif _is_16bit_colour_png(path):
        array = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        if array is None:
            raise ValueError(f"cannot read image file {path}: OpenCV could not decode it")
        array = cv2.cvtColor(array, cv2.COLOR_BGRA2RGBA if array.shape[-1] == 4 else cv2.COLOR_BGR2RGB)
    else:
        image = _read_pillow(path)
        if image.mode in ("1", "LA", "L"):
            image = image.convert("L")
        elif image.mode not in ("I;16", "I;16B", "I;16L", "I", "RGB", "RGBA"):
            image = image.convert("RGB")  # palette, CMYK, YCbCr, ...
        array = np.array(image)
    array = _as_uint(array, path)
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"image file {path} has shape {array.shape}; expected (H, W), (H, W, 3) or (H, W, 4) "
            "(multi-page or multi-channel TIFFs are not supported: save one 2-D image per file)"
        )
    return np.ascontiguousarray(array[:, :, :3])


def _colour_lookup(
    palette: Sequence[Sequence[int]] | Mapping[tuple[int, int, int], int],
) -> tuple[np.ndarray, np.ndarray]:
    """Sorted 24-bit colour codes and their class ids for ``np.searchsorted``."""
    items = palette.items() if isinstance(palette, Mapping) else ((c, i) for i, c in enumerate(palette))
    codes, ids = [], []
    for colour, class_id in items:
        r, g, b = (int(v) for v in colour)
        codes.append((r << 16) | (g << 8) | b)
        ids.append(int(class_id))
    codes_arr = np.asarray(codes, dtype=np.int64)
    if len(np.unique(codes_arr)) != len(codes_arr):
        raise ValueError(f"palette has repeated colours ({list(palette)}); each colour must map to one class id")
    order = np.argsort(codes_arr)
    return codes_arr[order], np.asarray(ids, dtype=np.int64)[order]


def _decode_colours(
    rgb: np.ndarray, palette: Sequence[Sequence[int]] | Mapping[tuple[int, int, int], int], path: Path
) -> np.ndarray:
    codes, ids = _colour_lookup(palette)
    rgb = rgb.astype(np.int64)
    pixel_codes = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    pos = np.clip(np.searchsorted(codes, pixel_codes), 0, len(codes) - 1)
    known = codes[pos] == pixel_codes
    if not known.all():
        unknown, counts = np.unique(pixel_codes[~known], return_counts=True)
        shown = ", ".join(
            f"({c >> 16}, {(c >> 8) & 255}, {c & 255}) x{n}" for c, n in list(zip(unknown, counts))[:5]
        )
        raise ValueError(
            f"mask file {path} has {len(unknown)} colour(s) not in the palette: {shown}; add them to the "
            "palette (a mapping colour -> id can send a void colour to ignore_index)"
        )
    return ids[pos]


def read_mask(
    path: str | Path,
    palette: Sequence[Sequence[int]] | Mapping[tuple[int, int, int], int] | None = None,
) -> np.ndarray:
    """Read a label map as raw integer values.

    A palette PNG gives its palette indices (VOC style), a single-channel 8/16-bit image its
    grey values. An RGB mask is refused unless ``palette`` maps its colours to ids (CamVid-style
    colour masks); ``palette`` is ignored for palette and grey masks.

    Args:
        path: Mask file (PNG, BMP, TIFF, ...).
        palette: RGB colour of each class id (list index = id), or a mapping ``(r, g, b) -> id``
            (use it to send a void colour to an ignore index).

    Returns:
        (H, W) int64 array of raw mask values.

    Raises:
        ValueError: Unreadable file, RGB mask without palette, or colours missing from the palette.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"mask file {path} does not exist")
    if path.suffix.lower() in _TIFF_SUFFIXES:
        array = _read_tiff(path)
        if not (np.issubdtype(array.dtype, np.integer) or array.dtype == bool):
            raise ValueError(
                f"mask file {path} has pixel type {array.dtype}; masks must hold integer class ids"
            )
    else:
        image = _read_pillow(path)
        if image.mode in ("P", "RGB", "RGBA", "1", "L", "I", "I;16", "I;16B", "I;16L"):
            array = np.array(image)  # a palette image gives its indices
        elif image.mode in ("LA", "PA"):
            array = np.array(image)[..., 0]
        else:
            array = np.array(image.convert("RGB"))
    if array.ndim == 3 and array.shape[-1] == 1:
        array = array[..., 0]
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        if palette is None:
            raise ValueError(
                f"mask file {path} is a colour (RGB) image; masks must be single-channel class ids "
                "(8/16-bit grey, or a palette PNG whose indices are the ids). Convert it, or pass a "
                "palette that maps each colour to its class id"
            )
        return _decode_colours(array[..., :3], palette, path)
    if array.ndim != 2:
        raise ValueError(f"mask file {path} has shape {array.shape}; expected a 2-D (H, W) label map")
    return array.astype(np.int64)


def encode_mask(labels: np.ndarray, palette: Sequence[Sequence[int]] | None = None, name: str = "labels") -> bytes:
    """A label map as 8-bit PNG bytes (what :func:`write_mask` writes; ``name`` appears in errors).

    With ``palette`` the PNG is indexed (mode "P", viewers show class colours and
    :func:`read_mask` returns the ids); without it, a grey PNG whose values are the ids.

    Args:
        labels: (H, W) integer class ids in 0..255.
        palette: RGB colour per id (at most 256); unlisted ids are black.
        name: What the labels are, for error messages (e.g. the output path).
    """
    labels = np.asarray(labels)
    if labels.ndim != 2 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise ValueError(
            f"labels must be a 2-D (H, W) integer array, got shape {labels.shape} dtype {labels.dtype}"
        )
    if labels.size and (labels.min() < 0 or labels.max() > 255):
        raise ValueError(
            f"labels to write to {name} range {labels.min()}..{labels.max()}; an 8-bit PNG mask holds "
            "0..255 only: remap the ids (e.g. ignore -> 255)"
        )
    image = Image.fromarray(labels.astype(np.uint8))
    if palette is not None:
        if len(palette) > 256:
            raise ValueError(f"palette has {len(palette)} colours; a PNG palette holds at most 256")
        flat = [int(v) for colour in palette for v in colour[:3]]
        image.putpalette(flat + [0] * (768 - len(flat)))  # turns the "L" image into "P", values kept
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def write_mask(
    path: str | Path, labels: np.ndarray, palette: Sequence[Sequence[int]] | None = None
) -> Path:
    """Write a label map as an 8-bit PNG (:func:`encode_mask`), atomically; returns ``path``."""
    data = encode_mask(labels, palette, name=str(path))
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))
