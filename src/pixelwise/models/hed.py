"""HED (Xie & Tu 2015, "Holistically-Nested Edge Detection", https://arxiv.org/abs/1504.06375).

VGG16 conv1..conv5 (no BN; pool5 unused). After the last ReLU of each stage (conv1_2,
conv2_2, conv3_3, conv4_3, conv5_3) a 1x1 conv gives K side logits, bilinearly resized to
the input size; a 1x1 conv initialised to 0.2 (bias 0) fuses the five side maps of each
class, so at initialisation the fused logits are the mean of the side logits.

Differences from the Caffe release, none of which changes the parameter count
(14,716,171 for K = 1): convs pad 1 (not conv1_1 pad 35 + crop) and the side maps are
resized with bilinear interpolation instead of fixed bilinear transposed convs + crop.
Side convs start from N(0, 0.01), bias 0. The loss (class-balanced BCE on every side
output and on the fuse, all weighted 1) lives in :mod:`pixelwise.losses`.
"""

from __future__ import annotations

import torch
from torch import nn

from pixelwise.models.backbones import VGG16
from pixelwise.models.layers import mirror_pad, resize_to

NUM_SIDES = 5
MIN_SIZE = 16  # conv5 sees H / 16: smaller images are mirror-padded to 16 px and cropped back


class HED(nn.Module):
    """VGG16 with five deeply supervised side outputs and a learned per-class fuse.

    ``forward`` returns the fused logits (N, K, H, W); ``forward_with_aux`` returns
    ``{"out": fused, "side1": ..., "side5": ...}``, all (N, K, H, W), and ``aux_weights``
    gives every side output weight 1.0. With K > 1 the fuse is grouped: class k's fused
    map only sees the five side maps of class k.

    Args:
        num_classes: K (1 for edges).
        in_channels: image channels.
    """

    def __init__(self, num_classes: int = 1, in_channels: int = 3) -> None:
        super().__init__()
        self.backbone = VGG16(in_channels)
        self.sides = nn.ModuleList(nn.Conv2d(c, num_classes, 1) for c in self.backbone.out_channels.values())
        self.fuse = nn.Conv2d(NUM_SIDES * num_classes, num_classes, 1, groups=num_classes)
        for side in self.sides:
            nn.init.normal_(side.weight, std=0.01)
            nn.init.zeros_(side.bias)
        nn.init.constant_(self.fuse.weight, 1.0 / NUM_SIDES)
        nn.init.zeros_(self.fuse.bias)
        self.aux_weights: dict[str, float] = {f"side{i}": 1.0 for i in range(1, NUM_SIDES + 1)}

    def side_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(N, C, H, W) -> five side logits, each (N, K, H, W).

        H or W under 16 px is mirror-padded at the bottom/right to 16 and the side maps
        are cropped back, so conv5 never sees an empty map.
        """
        h, w = x.shape[-2:]
        x = mirror_pad(x, 0, max(0, MIN_SIZE - h), 0, max(0, MIN_SIZE - w))
        size = x.shape[-2:]
        sides = []
        for i, ((convs, pool), side) in enumerate(zip(self.backbone.stages(), self.sides)):
            x = convs(x)
            sides.append(resize_to(side(x), size)[..., :h, :w])
            if i < NUM_SIDES - 1:  # pool5 is not used
                x = pool(x)
        return sides

    def forward_with_aux(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """(N, C, H, W) -> ``{"out", "side1", ..., "side5"}``, each (N, K, H, W)."""
        sides = self.side_outputs(x)
        n, k, h, w = sides[0].shape
        # Class-major order (class 0's five sides, then class 1's, ...) for the grouped fuse.
        stacked = torch.stack(sides, dim=2).reshape(n, k * NUM_SIDES, h, w)
        outputs = {"out": self.fuse(stacked)}
        outputs.update({f"side{i}": s for i, s in enumerate(sides, start=1)})
        return outputs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, C, H, W) -> (N, K, H, W) fused logits."""
        return self.forward_with_aux(x)["out"]


def hed(*, num_classes: int = 1, in_channels: int = 3) -> nn.Module:
    """HED edge detector (K = 1) or per-class edge detector (K > 1).

    Args:
        num_classes: K side/fused channels; 1 for binary edges.
        in_channels: image channels.
    """
    return HED(num_classes, in_channels)


MODELS = {"hed": hed}
