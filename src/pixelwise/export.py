"""Deployment: batch-norm folding, ONNX export, and fast CPU predictors.

Every predictor built here is a callable ``(N, C, h, w) -> (N, K, h, w)`` logits, so it can
be handed to :func:`pixelwise.inference.sliding_window` in place of the model.

Example:
    >>> from pixelwise.export import OnnxPredictor, export_onnx
    >>> export_onnx(model, "unet.onnx", height=512, width=512)
    >>> predictor = OnnxPredictor("unet.onnx", threads=4)
    >>> logits = predictor(torch.randn(2, 3, 512, 512))  # (2, K, 512, 512)
"""

from __future__ import annotations

import contextlib
import copy
import functools
import json
import logging
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from pixelwise.io import atomic_write
from pixelwise.models.registry import MODELS, spatial_dims

__all__ = [
    "OnnxPredictor", "TorchPredictor", "calibration_batch", "export_onnx", "export_onnx_int8", "fold_batchnorm",
    "prepare_for_cpu",
]

Predictor = Callable[[torch.Tensor], torch.Tensor]

_META_PREFIX = "pixelwise."
_PROTOBUF_LIMIT = 2**31 - 2**26  # an .onnx file without external data must stay under 2 GiB


# ---------------------------------------------------------------------------
# Batch-norm folding
# ---------------------------------------------------------------------------


def _infer_in_channels(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    if isinstance(config, dict) and isinstance(config.get("in_channels"), int):
        return config["in_channels"]
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return m.in_channels
    raise ValueError(
        "cannot tell the model's input channels: it has no config['in_channels'] and no Conv2d; "
        "pass in_channels= (export_onnx) or example= (fold_batchnorm)"
    )


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    """A plain Conv2d followed by an eval-mode BatchNorm2d over its output channels."""
    return (
        type(conv) is nn.Conv2d
        and type(bn) is nn.BatchNorm2d
        and bn.track_running_stats
        and bn.num_features == conv.out_channels
        and not torch.nn.utils.parametrize.is_parametrized(conv)
    )


@torch.no_grad()
def _fold_into_conv(conv: nn.Conv2d, bn: nn.BatchNorm2d) -> None:
    """Rescale ``conv`` in place so that ``conv(x) == bn(conv_before(x))`` in eval mode."""
    # Per-channel factors in float64 (small vectors); one rounding when applied to the weights.
    scale = bn.running_var.double().add(bn.eps).rsqrt()
    shift = -bn.running_mean.double() * scale
    if bn.affine:
        scale = scale * bn.weight.double()
        shift = shift * bn.weight.double() + bn.bias.double()
    bias = conv.bias.double() if conv.bias is not None else torch.zeros_like(shift)
    conv.weight.mul_(scale.to(conv.weight.dtype).view(-1, 1, 1, 1))
    new_bias = (bias * scale + shift).to(conv.weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=conv.weight.requires_grad)
    else:
        conv.bias.copy_(new_bias)


class _DataflowProbe(TorchFunctionMode):
    """Records, during one forward, which module consumes each Conv2d output and feeds each BN.

    A tensor's consumer is the innermost module running when a torch function or tensor
    method receives it (``None`` outside any module).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.running: list[nn.Module] = []
        self.produced_by: dict[int, nn.Module] = {}  # id(conv output) -> conv
        self.alive: list[torch.Tensor] = []  # keeps recorded outputs alive so ids stay unique
        self.consumers: dict[nn.Module, set[nn.Module | None]] = {}
        self.bn_sources: dict[nn.Module, list[nn.Module | None]] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        for m in model.modules():
            self.handles.append(m.register_forward_pre_hook(self._enter))
            self.handles.append(m.register_forward_hook(self._leave))

    def _enter(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        if type(module) is nn.BatchNorm2d:
            source = self.produced_by.get(id(args[0])) if args and isinstance(args[0], torch.Tensor) else None
            self.bn_sources.setdefault(module, []).append(source)
        self.running.append(module)

    def _leave(self, module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self.running.pop()
        if type(module) is nn.Conv2d and isinstance(output, torch.Tensor):
            self.produced_by[id(output)] = module
            self.alive.append(output)
            self.consumers.setdefault(module, set())

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: tuple[type, ...],
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        user = self.running[-1] if self.running else None
        for leaf in tree_leaves((args, kwargs)):
            if isinstance(leaf, torch.Tensor) and id(leaf) in self.produced_by:
                self.consumers[self.produced_by[id(leaf)]].add(user)
        return func(*args, **kwargs)

    def returned(self, output: Any) -> None:
        """Mark conv outputs that the model returns as used outside any BN."""
        for leaf in tree_leaves(output):
            if isinstance(leaf, torch.Tensor) and id(leaf) in self.produced_by:
                self.consumers[self.produced_by[id(leaf)]].add(None)

    def safe_pairs(self) -> list[tuple[nn.Conv2d, nn.BatchNorm2d]]:
        """(conv, bn) where every output of the conv went only to the bn, and the bn only got those."""
        pairs = []
        for bn, sources in self.bn_sources.items():
            conv = sources[0]
            if conv is None or any(s is not conv for s in sources) or self.consumers[conv] != {bn}:
                continue
            if _foldable(conv, bn):
                pairs.append((conv, bn))
        return pairs

    def close(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.alive.clear()


def fold_batchnorm(model: nn.Module, example: torch.Tensor | None = None) -> nn.Module:
    """An eval-mode copy of ``model`` with each Conv2d -> BatchNorm2d pair merged into the conv.

    The conv's weight and bias are rescaled by the BN's running statistics and affine
    parameters and the BN becomes ``nn.Identity``; the copy computes the same eval-mode
    function with fewer passes over memory. ``model`` itself is not changed.

    Which pairs are safe is read from the data flow of one forward pass of the copy on
    ``example``, whatever the code looks like (``nn.Sequential`` neighbours such as
    ``ConvBNReLU``, ResNet's ``conv1``/``bn1`` and ``downsample``, custom forwards): a pair
    is folded only if every output of the conv was used by nothing but the BN, and the BN
    received nothing but outputs of that conv. A BN that follows a ReLU, a concatenation or
    a conv whose output is also used elsewhere (a skip or side output) is kept, as are
    BNs of branches the forward pass did not run (e.g. auxiliary heads).

    Args:
        model: any module; usually maps (N, C, H, W) images to logits.
        example: input for the probe pass; defaults to a (1, C, 64, 64) normal sample with C
            from ``model.config["in_channels"]`` or the first Conv2d. Pass one when the
            model takes other inputs, or when its forward branches on the input size.
    """
    folded = copy.deepcopy(model).eval()
    if example is None:
        param = next(folded.parameters(), None)
        kind = {"dtype": param.dtype, "device": param.device} if param is not None else {}
        example = torch.randn(1, _infer_in_channels(model), 64, 64, **kind)
    probe = _DataflowProbe(folded)
    try:
        with torch.no_grad(), probe:
            probe.returned(folded(example))
    except Exception as err:
        raise ValueError(
            f"fold_batchnorm runs the model once to see which convs feed which BNs, and the forward failed "
            f"on an input of shape {tuple(example.shape)}: {err}. Pass example= an input the model accepts."
        ) from err
    finally:
        probe.close()
    pairs = probe.safe_pairs()
    folded_bns = {id(bn) for _, bn in pairs}
    for conv, bn in pairs:
        _fold_into_conv(conv, bn)
    for parent in list(folded.modules()):
        for name, child in list(parent._modules.items()):
            if id(child) in folded_bns:
                setattr(parent, name, nn.Identity())
    return folded


# ---------------------------------------------------------------------------
# ONNX export
# ---------------------------------------------------------------------------


_NOISY_LOGGERS = (
    "torch.onnx._internal.exporter._registration",  # "torchvision is not installed. Skipping ..."
    "onnx_ir._convenience",  # "Attribute type is ambiguous ..." for MaxUnpool's empty attributes
)


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide the exporter's harmless warnings (pixelwise uses no torchvision ops)."""
    loggers = [logging.getLogger(name) for name in _NOISY_LOGGERS]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


@contextlib.contextmanager
def _evaluating(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; every submodule's own mode restored after it."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def export_onnx(
    model: nn.Module,
    path: str | Path,
    *,
    height: int,
    width: int,
    in_channels: int | None = None,
    dynamic_batch: bool = True,
    opset: int = 20,
    fold_bn: bool = True,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Export ``model`` to ONNX for inputs of a fixed ``height`` x ``width``; returns the path.

    Uses the dynamo exporter (``torch.onnx.export(..., dynamo=True)``), which handles
    MaxUnpool2d and adaptive pooling at a fixed spatial size. The graph has one input
    ``"image"`` (N, C, height, width) float32 and one output ``"logits"`` (N, K, height,
    width); N is symbolic when ``dynamic_batch``. Images of other sizes are run tile by tile
    (see :class:`OnnxPredictor`). The metadata properties ``pixelwise.config`` (JSON of
    ``model.config``), ``pixelwise.height``, ``pixelwise.width`` and
    ``pixelwise.in_channels`` record what was exported, and ``pixelwise.extra`` the JSON
    ``extra`` saved with the model (class names, palette, mean/std), so that ``predict`` can
    run the file without the checkpoint. The model is exported in eval
    mode (with BNs folded into a copy when ``fold_bn``); ``model`` itself is left as it was.

    The file is written atomically: if the export fails, ``path`` keeps its old content (or
    stays absent) and no temporary file is left behind.

    Args:
        model: maps (N, C, H, W) images to (N, K, H, W) logits.
        path: destination ``.onnx`` file.
        height: input height the graph is specialised to.
        width: input width the graph is specialised to.
        in_channels: C; defaults to ``model.config["in_channels"]``, else the first Conv2d's.
        dynamic_batch: symbolic batch size; ``False`` fixes it to 1.
        opset: ONNX opset version.
        fold_bn: merge BatchNorm into the preceding conv first (:func:`fold_batchnorm`).
        extra: the model's saved ``extra`` (:func:`pixelwise.models.load_model`), kept as metadata.
    """
    name = getattr(model, "config", {}).get("name")
    if name in MODELS and spatial_dims(name) != 2:
        raise ValueError(f"ONNX export takes 2D models (N, C, H, W); {name} is {spatial_dims(name)}D: predict volumes with the torch runtime")
    height = _positive_int("height", height)
    width = _positive_int("width", width)
    in_channels = _infer_in_channels(model) if in_channels is None else _positive_int("in_channels", in_channels)
    nbytes = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))
    if nbytes > _PROTOBUF_LIMIT:
        raise ValueError(
            f"the model holds {nbytes / 2**30:.1f} GiB of weights; a single .onnx file is limited to 2 GiB. "
            "Export a smaller variant of the model."
        )
    batch = 2 if dynamic_batch else 1  # size 1 would be specialised by torch.export
    example = torch.randn(batch, in_channels, height, width)
    has_bn = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    net = fold_batchnorm(model, example) if fold_bn and has_bn else model
    dynamic_shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    metadata = {
        "config": json.dumps(getattr(model, "config", {}), default=str),
        "height": str(height),
        "width": str(width),
        "in_channels": str(in_channels),
        "extra": json.dumps(extra or {}, default=str),
    }

    def write(tmp: str) -> None:
        with torch.no_grad(), _quiet_exporter(), _evaluating(net):
            program = torch.onnx.export(
                net,
                (example,),
                None,
                dynamo=True,
                input_names=["image"],
                output_names=["logits"],
                opset_version=opset,
                dynamic_shapes=dynamic_shapes,
                verbose=False,
            )
        program.model.metadata_props.update({_META_PREFIX + k: v for k, v in metadata.items()})
        program.save(tmp, external_data=False)

    return atomic_write(path, write)


# ---------------------------------------------------------------------------
# int8 static quantization (ONNX Runtime, QDQ)
# ---------------------------------------------------------------------------

# Normalised calibration pixels whose per-channel mean or std fall outside these bounds are
# not the kind of data the model was trained on (its own data normalises to about 0 and 1).
_CALIBRATION_MEAN_LIMIT = 2.0
_CALIBRATION_STD_RANGE = (0.2, 5.0)


def _crop_or_cover(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(C, h, w) -> (C, height, width): the centre crop, after a bilinear upscale if it is smaller."""
    h, w = image.shape[-2:]
    scale = max(height / h, width / w)
    if scale > 1:
        size = (max(height, round(h * scale)), max(width, round(w * scale)))
        image = torch.nn.functional.interpolate(image[None], size=size, mode="bilinear", align_corners=False)[0]
        h, w = size
    top, left = (h - height) // 2, (w - width) // 2
    return image[:, top : top + height, left : left + width]


def calibration_batch(
    dataset: Any,
    *,
    height: int,
    width: int,
    in_channels: int,
    num_images: int = 32,
    class_names: list[str] | None = None,
    normalised: bool = True,
    source: str = "--calibrate",
) -> torch.Tensor:
    """(N, C, height, width) calibration images from ``dataset``, checked against the model.

    Takes ``num_images`` images spread evenly over the data set (all if fewer), each centre-
    cropped to the export size (upscaled first when smaller), as the model sees them: the
    dataset must already apply the model's normalisation (``eval_transform(mean, std)``).

    Raises a ValueError naming ``source`` when the images do not fit the model: a different
    number of channels, a different class list (``class_names``: the model's; ``None``
    skips the check), or, when ``normalised`` (the model has a mean/std), per-channel pixel
    statistics far from the 0 and 1 that the model's own training data normalises to.

    Args:
        dataset: samples ``(image (C, H, W) float, labels)``; ``class_names`` if it has them.
        height, width: the export size.
        in_channels: C the model takes.
        num_images: how many images to take.
        class_names: the model's class names (``extra["class_names"]``).
        normalised: whether the model was trained on mean/std-normalised images.
        source: the argument that named the data, for error messages.
    """
    num_images = _positive_int("calib_images", num_images)
    if len(dataset) == 0:
        raise ValueError(f"{source}: the calibration data set is empty; point it at a split with images")
    names = getattr(dataset, "class_names", None)
    if class_names is not None and names is not None and list(names) != list(class_names):
        raise ValueError(
            f"{source}: the calibration data set has classes {list(names)} but the model was trained on "
            f"{list(class_names)}; calibrate on the model's own data set (or one with the same class list)"
        )
    count = min(num_images, len(dataset))
    indices = sorted({round(i * (len(dataset) - 1) / max(count - 1, 1)) for i in range(count)})
    images = []
    for i in indices:
        image = dataset[i][0]
        if image.ndim != 3 or image.shape[0] != in_channels:
            raise ValueError(
                f"{source}: image {i} of the calibration data set has shape {tuple(image.shape)} but the model "
                f"takes {in_channels}-channel images; calibrate on data with {in_channels} channel(s)"
            )
        images.append(_crop_or_cover(image.float(), height, width))
    batch = torch.stack(images)
    if normalised:
        mean = batch.mean(dim=(0, 2, 3))
        std = batch.std(dim=(0, 2, 3))
        low, high = _CALIBRATION_STD_RANGE
        if mean.abs().max() > _CALIBRATION_MEAN_LIMIT or std.min() < low or std.max() > high:
            raise ValueError(
                f"{source}: normalised with the model's mean/std, the calibration images have per-channel mean "
                f"{[round(v, 2) for v in mean.tolist()]} and std {[round(v, 2) for v in std.tolist()]}, far from the "
                "0 and 1 of the model's training data; calibrate on images like those the model was trained on"
            )
    return batch


def _first_and_last_convs(model: Any) -> list[str]:
    """Names of the first and the last (transposed) convolution of an ``onnx.ModelProto``.

    ONNX lists nodes in topological order: the first reads the image, the last makes the
    logits (the classifier, or FCN's final upsampling).
    """
    convs = [node.name for node in model.graph.node if node.op_type in ("Conv", "ConvTranspose")]
    return list(dict.fromkeys([convs[0], convs[-1]])) if convs else []


class _BatchReader:
    """``onnxruntime.quantization.CalibrationDataReader`` over a (N, C, H, W) batch, ``batch`` at a time."""

    def __init__(self, name: str, images: torch.Tensor, batch: int) -> None:
        self._feeds = iter([{name: chunk.contiguous().numpy()} for chunk in images.split(batch)])

    def get_next(self) -> dict[str, Any] | None:
        return next(self._feeds, None)


def export_onnx_int8(
    model: nn.Module,
    path: str | Path,
    calibration: torch.Tensor,
    *,
    height: int,
    width: int,
    keep_fp32: Literal["none", "ends"] = "ends",
    extra: dict[str, Any] | None = None,
) -> Path:
    """Export ``model`` to ONNX with int8 weights and activations (static post-training quantization).

    :func:`export_onnx` writes the fp32 graph; ONNX Runtime's ``quantize_static`` then
    inserts QuantizeLinear/DequantizeLinear pairs (QDQ format) with per-output-channel
    symmetric int8 weights and uint8 activations whose ranges are the min/max seen on
    ``calibration`` (real images of the user's data set, normalised as for the model:
    :func:`calibration_batch`). ONNX Runtime's CPU provider then runs the convolutions in
    int8. ``keep_fp32="ends"`` leaves the first convolution (raw image in) and the last
    (the classifier, whose logits feed the argmax / softmax) in fp32; ``"none"`` quantizes
    every node. Measured on small models trained on synthetic shapes, the last conv costs
    the most agreement with fp32 (SegNet-Basic: 97.4 % of pixels with every node int8,
    97.6 % first fp32, 98.5 % last fp32, 98.7 % both), hence ``"ends"`` (benchmarks/README.md).
    The file records which nodes stayed fp32 in ``pixelwise.int8_fp32_nodes`` and is run
    like any other export by :class:`OnnxPredictor`.

    Args:
        model: maps (N, C, H, W) images to (N, K, H, W) logits.
        path: destination ``.onnx`` file (written atomically).
        calibration: (N, C, height, width) normalised images.
        height, width: the fixed export size.
        keep_fp32: ``"ends"`` (first and last conv in fp32) or ``"none"``.
        extra: the model's saved ``extra``, kept as metadata (see :func:`export_onnx`).
    """
    import onnx
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    height = _positive_int("height", height)
    width = _positive_int("width", width)
    if keep_fp32 not in ("none", "ends"):
        raise ValueError(f"keep_fp32 must be 'none' or 'ends', got {keep_fp32!r}")
    in_channels = _infer_in_channels(model)
    if calibration.ndim != 4 or tuple(calibration.shape[1:]) != (in_channels, height, width):
        raise ValueError(
            f"calibration must be (N, {in_channels}, {height}, {width}) images (the model's channels at the export "
            f"size), got shape {tuple(calibration.shape)}; build it with pixelwise.export.calibration_batch"
        )
    with tempfile.TemporaryDirectory(prefix="pixelwise-int8-") as tmp:
        fp32 = export_onnx(
            model, Path(tmp) / "fp32.onnx", height=height, width=width, in_channels=in_channels, extra=extra
        )
        prepared = Path(tmp) / "prepared.onnx"  # shapes inferred and graph optimised, as quantize_static asks
        quant_pre_process(str(fp32), str(prepared))
        graph = onnx.load(prepared)
        excluded = _first_and_last_convs(graph) if keep_fp32 == "ends" else []

        def write(out: str) -> None:
            quantize_static(
                str(prepared), out, _BatchReader(graph.graph.input[0].name, calibration.float(), batch=4),
                quant_format=QuantFormat.QDQ, per_channel=True, activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax, nodes_to_exclude=excluded,
            )
            quantized = onnx.load(out)
            quantized.metadata_props.add(key=_META_PREFIX + "int8_fp32_nodes", value=json.dumps(excluded))
            onnx.save(quantized, out)

        return atomic_write(path, write)


# ---------------------------------------------------------------------------
# Predictors
# ---------------------------------------------------------------------------


class OnnxPredictor:
    """An ONNX Runtime (CPU) session behind the predictor interface ``(N, C, H, W) -> (N, K, H, W)``.

    ``H`` and ``W`` must equal the exported size (``.height``, ``.width``); larger images go
    through :func:`pixelwise.inference.sliding_window` with ``tile=(predictor.height,
    predictor.width)``.

    Args:
        path: an ``.onnx`` file written by :func:`export_onnx` (any single-input,
            single-output image model works; the metadata is then empty).
        threads: intra-op threads; ``None`` lets ONNX Runtime choose (one per core).
        memory_arena: keep ONNX Runtime's CPU memory arena (default). It keeps the memory
            it once held; turning it off cut tiled segnet_basic's peak RSS from 3.3 to
            2.0 GB for 8 % more time (benchmarks/README.md).

    Attributes:
        height, width: the exported input size (``None`` for a symbolic dimension).
        in_channels: C of the exported input.
        config: the model's creation arguments (``{}`` if not recorded).
        extra: the model's saved ``extra`` (class names, palette, mean/std; ``{}`` if not recorded).
        int8: whether the file was quantized by :func:`export_onnx_int8`.
    """

    def __init__(self, path: str | Path, threads: int | None = None, memory_arena: bool = True) -> None:
        import onnxruntime as ort

        self.path = Path(path)
        if not self.path.is_file():
            raise ValueError(f"ONNX file {str(self.path)!r} does not exist; write one with pixelwise.export.export_onnx")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads is not None:
            options.intra_op_num_threads = _positive_int("threads", threads)
        options.enable_cpu_mem_arena = bool(memory_arena)
        self.session = ort.InferenceSession(str(self.path), options, providers=["CPUExecutionProvider"])
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(outputs) != 1:
            raise ValueError(
                f"{str(self.path)!r} has {len(inputs)} inputs and {len(outputs)} outputs; OnnxPredictor runs "
                "image -> logits graphs with one of each, as export_onnx writes"
            )
        graph_input = inputs[0]
        self._input_name, self._output_name = graph_input.name, outputs[0].name
        dims = [d if isinstance(d, int) else None for d in graph_input.shape]
        self.batch, self.in_channels, self.height, self.width = dims
        meta = {
            k[len(_META_PREFIX) :]: v
            for k, v in self.session.get_modelmeta().custom_metadata_map.items()
            if k.startswith(_META_PREFIX)
        }
        self.config: dict[str, Any] = json.loads(meta.get("config", "{}"))
        self.extra: dict[str, Any] = json.loads(meta.get("extra", "{}"))
        self.int8 = "int8_fp32_nodes" in meta

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) float images -> (N, K, H, W) float32 logits (on the CPU)."""
        if x.ndim != 4:
            raise ValueError(f"expected an (N, C, H, W) batch, got shape {tuple(x.shape)}")
        n, c, h, w = x.shape
        if (self.height is not None and h != self.height) or (self.width is not None and w != self.width):
            raise ValueError(
                f"{self.path.name} was exported for {self.height}x{self.width} inputs, got {h}x{w}. "
                f"Run larger images tile by tile: pixelwise.inference.sliding_window(predictor, image, "
                f"tile=({self.height}, {self.width}), ...), or export again at this size."
            )
        if self.in_channels is not None and c != self.in_channels:
            raise ValueError(f"{self.path.name} expects {self.in_channels} input channels, got {c}")
        if self.batch is not None and n != self.batch:
            raise ValueError(f"{self.path.name} was exported with a fixed batch of {self.batch}, got {n}")
        feed = x.detach().to("cpu", torch.float32).contiguous().numpy()
        (logits,) = self.session.run([self._output_name], {self._input_name: feed})
        return torch.from_numpy(logits)

    def __repr__(self) -> str:
        return f"OnnxPredictor({str(self.path)!r}, input={self.in_channels}x{self.height}x{self.width})"


class TorchPredictor:
    """A BN-folded, channels-last, eval-mode model run under ``torch.inference_mode``.

    A valid-convolution model (the original U-Net: an int ``valid_margin`` and a
    ``forward_valid`` method) keeps both on the predictor, so ``sliding_window`` still
    runs it with the overlap-tile strategy.

    Args:
        model: maps (N, C, H, W) to (N, K, H, W) logits; it is copied, not changed.
        compile: wrap the copy in ``torch.compile`` (the first call of each new input
            shape compiles, which takes tens of seconds on a CPU).
    """

    def __init__(self, model: nn.Module, compile: bool = False) -> None:
        self.model = fold_batchnorm(model).to(memory_format=torch.channels_last)
        self.compiled = compile
        self._forward = torch.compile(self.model) if compile else self.model
        margin = getattr(model, "valid_margin", None)
        if isinstance(margin, int) and not isinstance(margin, bool) and callable(getattr(model, "forward_valid", None)):
            self.valid_margin = margin
            valid = torch.compile(self.model.forward_valid) if compile else self.model.forward_valid
            self.forward_valid = functools.partial(self._run, valid)

    @staticmethod
    def _run(forward: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return forward(x.contiguous(memory_format=torch.channels_last))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, K, H, W) logits, without autograd."""
        return self._run(self._forward, x)

    def __repr__(self) -> str:
        return f"TorchPredictor({type(self.model).__name__}, compile={self.compiled})"


def prepare_for_cpu(
    model: nn.Module,
    runtime: Literal["torch", "compile", "onnx"] = "torch",
    *,
    tile: int | tuple[int, int] | None = None,
    onnx_path: str | Path | None = None,
    threads: int | None = None,
    memory_arena: bool = True,
) -> Predictor:
    """A fast CPU predictor ``(N, C, h, w) -> (N, K, h, w)`` for ``model`` (``predict --runtime``).

    Runtimes:
        - ``"torch"``: :class:`TorchPredictor` (BN folded, channels-last, inference mode);
          any input size.
        - ``"compile"``: the same, wrapped in ``torch.compile``.
        - ``"onnx"``: :func:`export_onnx` at the ``tile`` size, then
          :class:`OnnxPredictor`; inputs must be exactly ``tile``-sized, so run images
          through :func:`pixelwise.inference.sliding_window` with the same tile. The
          ``.onnx`` is kept at ``onnx_path`` when given (reuse it later with
          ``OnnxPredictor(onnx_path)``), else written to a temporary directory and removed.

    Args:
        model: maps (N, C, H, W) to (N, K, H, W) logits; it is not changed.
        runtime: ``"torch"``, ``"compile"`` or ``"onnx"``.
        tile: (height, width), or one int for a square, of the inputs the predictor will
            get (the ``sliding_window`` tile); required for ``"onnx"``, which is exported for
            exactly that size. The torch runtimes take any size and do not need it.
        onnx_path: where to keep the exported file (``"onnx"`` only).
        threads: CPU threads: ONNX Runtime intra-op threads, or for the torch runtimes
            ``torch.set_num_threads`` (process-wide). ``None`` keeps the default.
        memory_arena: ONNX Runtime's CPU memory arena (``"onnx"`` only; see :class:`OnnxPredictor`).
    """
    if runtime not in ("torch", "compile", "onnx"):
        raise ValueError(f"runtime must be 'torch', 'compile' or 'onnx', got {runtime!r}")
    if threads is not None:
        threads = _positive_int("threads", threads)
    if runtime != "onnx":
        if onnx_path is not None:
            raise ValueError(f"onnx_path= applies to runtime='onnx' only, got it with runtime={runtime!r}")
        if threads is not None:
            torch.set_num_threads(threads)
        return TorchPredictor(model, compile=runtime == "compile")
    if isinstance(tile, int):
        tile = (tile, tile)
    if not isinstance(tile, (tuple, list)) or len(tile) != 2:
        raise ValueError(f"runtime='onnx' needs tile=(height, width) to export for, got tile={tile!r}")
    height, width = (_positive_int("tile", t) for t in tile)
    if onnx_path is not None:
        return OnnxPredictor(export_onnx(model, onnx_path, height=height, width=width), threads, memory_arena)
    with tempfile.TemporaryDirectory(prefix="pixelwise-onnx-") as tmp:
        # The session holds the whole graph in memory, so the file can go right after loading.
        path = export_onnx(model, Path(tmp) / "model.onnx", height=height, width=width)
        return OnnxPredictor(path, threads, memory_arena)
