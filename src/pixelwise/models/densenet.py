"""FC-DenseNet ("The One Hundred Layers Tiramisu"): Jegou, Drozdzal, Vazquez, Romero & Bengio,
"The One Hundred Layers Tiramisu: Fully Convolutional DenseNets for Semantic Segmentation",
CVPRW 2017 (https://arxiv.org/abs/1611.09326), as the authors' Lasagne code (SimJeg/FC-DenseNet).

For an input (N, C, H, W), with growth rate k::

    first conv 3x3 C->48
    5 x [dense block (input + new maps kept, saved as skip) -> transition down]
    bottleneck dense block: only its n * k new maps go up
    5 x [transition up of the previous block's new maps, concat skip -> dense block]
    last block's full stack -> 1x1 conv -> (N, K, H, W)

Dense layer: BN -> ReLU -> 3x3 conv (k maps) -> dropout 0.2; each layer sees the block input
and all earlier layers' maps. Transition down: BN -> ReLU -> 1x1 conv (same width) ->
dropout -> 2x2 max-pool. Transition up: 3x3 stride-2 transposed conv (same width), centre
cropped to the skip's size. Inputs are mirror-padded to a multiple of 32 and the logits
cropped back, so any size works.

| model | layers per block (down, bottleneck, up) | k | parameters, 11 classes | paper |
| --- | --- | --- | --- | --- |
| FC-DenseNet56 | 4 everywhere | 12 | 1,376,795 (1,397,963) | 1.5M |
| FC-DenseNet67 | 5 everywhere | 16 | 3,463,243 (3,502,923) | 3.5M |
| FC-DenseNet103 | 4 5 7 10 12, 15, 12 10 7 5 4 | 16 | 9,322,091 (9,425,163) | 9.4M |

In brackets: the count with the BN running mean and variance included, as Lasagne's
``count_params`` counts them; that is what the paper's 3.5M and 9.4M match.

``memory_efficient=True`` trades compute for training memory as in Pleiss et al., "Memory-
Efficient Implementation of DenseNets" (https://arxiv.org/abs/1707.06990): each dense layer's
concatenation -> BN -> ReLU -> conv is recomputed in the backward pass (``torch.utils.checkpoint``)
instead of keeping the concatenated and normalised maps of every layer, which grow with depth.
Outputs, gradients and state-dict keys are those of the plain model.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from pixelwise.models.layers import crop_to, pad_to_multiple


class DenseLayer(nn.Sequential):
    """BN -> ReLU -> 3x3 conv -> dropout: (N, C, H, W) -> (N, growth_rate, H, W)."""

    def __init__(self, in_channels: int, growth_rate: int, dropout: float) -> None:
        super().__init__(
            nn.BatchNorm2d(in_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(in_channels, growth_rate, 3, padding=1),
            nn.Dropout(dropout),
        )

    def checkpointed(self, features: list[torch.Tensor]) -> torch.Tensor:
        """``self(torch.cat(features, 1))``, keeping none of its intermediate maps for backward.

        They are recomputed in the backward pass; the recomputation uses the same dropout mask
        (checkpoint restores the RNG state) and does not update the BN running statistics a
        second time.
        """
        norm, relu, conv, drop = self
        first_run = True

        def run(*maps: torch.Tensor) -> torch.Tensor:
            nonlocal first_run
            x = torch.cat(maps, 1)
            if first_run:
                x = norm(x)
            else:  # recomputation in backward: the same batch statistics, updating copies of the running ones
                stats = (norm.running_mean.clone(), norm.running_var.clone())
                x = F.batch_norm(x, *stats, norm.weight, norm.bias, True, 0.0, norm.eps)
            first_run = False
            return drop(conv(relu(x)))

        return checkpoint(run, *features, use_reentrant=False)


class DenseBlock(nn.Module):
    """``num_layers`` dense layers, each fed the input and all earlier layers' outputs.

    Shapes: (N, C, H, W) -> the new maps only, (N, num_layers * growth_rate, H, W); callers
    concatenate the input themselves where the paper keeps it (the down path).
    ``memory_efficient`` recomputes each layer in backward (:meth:`DenseLayer.checkpointed`)
    when training with gradients; the result is the same.
    """

    def __init__(
        self, in_channels: int, growth_rate: int, num_layers: int, dropout: float, memory_efficient: bool = False
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            DenseLayer(in_channels + i * growth_rate, growth_rate, dropout) for i in range(num_layers)
        )
        self.out_channels = num_layers * growth_rate
        self.memory_efficient = memory_efficient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.memory_efficient and self.training and torch.is_grad_enabled():
            features = [x]
            for layer in self.layers:
                features.append(layer.checkpointed(features))
            return torch.cat(features[1:], 1)
        new = []
        for layer in self.layers:
            out = layer(x)
            new.append(out)
            x = torch.cat([x, out], 1)
        return torch.cat(new, 1)


class TransitionDown(nn.Sequential):
    """BN -> ReLU -> 1x1 conv -> dropout -> 2x2 max-pool: (N, C, H, W) -> (N, C, H/2, W/2)."""

    def __init__(self, channels: int, dropout: float) -> None:
        super().__init__(
            nn.BatchNorm2d(channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 1),
            nn.Dropout(dropout),
            nn.MaxPool2d(2, 2),
        )


class TransitionUp(nn.Module):
    """3x3 stride-2 transposed conv, centre-cropped to the skip, concatenated before it.

    Shapes: x (N, C, h, w), skip (N, S, H, W) with 2h >= H -> (N, C + S, H, W).
    """

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.ConvTranspose2d(channels, channels, 3, stride=2)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        x = crop_to(self.conv(x), *skip.shape[-2:])
        return torch.cat([x, skip], 1)


class FCDenseNet(nn.Module):
    """Fully convolutional DenseNet (see the module docstring for the layout and sizes).

    Args:
        num_classes: K, number of output classes.
        in_channels: image channels.
        block_layers: layers of the 5 down blocks; the up blocks mirror them.
        bottleneck_layers: layers of the bottleneck block.
        growth_rate: k, maps added by each dense layer.
        first_channels: output width of the first 3x3 conv (48).
        dropout: dropout probability after every conv (0.2).
        memory_efficient: recompute dense layers in backward to lower peak training memory
            (see the module docstring); same outputs, gradients and state-dict keys.

    Shapes: (N, in_channels, H, W) -> (N, K, H, W) for any H, W.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        block_layers: Sequence[int] = (4, 5, 7, 10, 12),
        bottleneck_layers: int = 15,
        growth_rate: int = 16,
        first_channels: int = 48,
        dropout: float = 0.2,
        memory_efficient: bool = False,
    ) -> None:
        super().__init__()
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        block_layers = tuple(block_layers)
        self.pad_multiple = 2 ** len(block_layers)
        self.first_conv = nn.Conv2d(in_channels, first_channels, 3, padding=1)
        channels = first_channels
        skip_channels = []
        self.down_blocks = nn.ModuleList()
        self.trans_down = nn.ModuleList()
        for n in block_layers:
            self.down_blocks.append(DenseBlock(channels, growth_rate, n, dropout, memory_efficient))
            channels += n * growth_rate
            skip_channels.append(channels)
            self.trans_down.append(TransitionDown(channels, dropout))
        self.bottleneck = DenseBlock(channels, growth_rate, bottleneck_layers, dropout, memory_efficient)
        up_channels = self.bottleneck.out_channels
        self.trans_up = nn.ModuleList()
        self.up_blocks = nn.ModuleList()
        for n, skip in zip(reversed(block_layers), reversed(skip_channels)):
            self.trans_up.append(TransitionUp(up_channels))
            self.up_blocks.append(DenseBlock(up_channels + skip, growth_rate, n, dropout, memory_efficient))
            channels = up_channels + skip + n * growth_rate
            up_channels = n * growth_rate
        self.head = nn.Conv2d(channels, num_classes, 1)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, K, H, W) logits."""
        h, w = x.shape[-2:]
        x = self.first_conv(pad_to_multiple(x, self.pad_multiple))
        skips = []
        for block, down in zip(self.down_blocks, self.trans_down):
            x = torch.cat([x, block(x)], 1)
            skips.append(x)
            x = down(x)
        new = self.bottleneck(x)
        for up, block, skip in zip(self.trans_up, self.up_blocks, reversed(skips)):
            x = up(new, skip)
            new = block(x)
        return crop_to(self.head(torch.cat([x, new], 1)), h, w, 0, 0)


def fcdensenet56(
    *, num_classes: int, in_channels: int = 3, dropout: float = 0.2, memory_efficient: bool = False
) -> FCDenseNet:
    """FC-DenseNet56: 4 layers per block, growth rate 12."""
    return FCDenseNet(num_classes, in_channels, (4,) * 5, 4, 12, dropout=dropout, memory_efficient=memory_efficient)


def fcdensenet67(
    *, num_classes: int, in_channels: int = 3, dropout: float = 0.2, memory_efficient: bool = False
) -> FCDenseNet:
    """FC-DenseNet67: 5 layers per block, growth rate 16."""
    return FCDenseNet(num_classes, in_channels, (5,) * 5, 5, 16, dropout=dropout, memory_efficient=memory_efficient)


def fcdensenet103(
    *, num_classes: int, in_channels: int = 3, dropout: float = 0.2, memory_efficient: bool = False
) -> FCDenseNet:
    """FC-DenseNet103: blocks 4, 5, 7, 10, 12, bottleneck 15, growth rate 16."""
    return FCDenseNet(num_classes, in_channels, (4, 5, 7, 10, 12), 15, 16, dropout=dropout, memory_efficient=memory_efficient)


MODELS = {
    "fcdensenet56": fcdensenet56,
    "fcdensenet67": fcdensenet67,
    "fcdensenet103": fcdensenet103,
}
