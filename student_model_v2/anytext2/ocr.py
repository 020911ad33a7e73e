"""PP-OCRv3-style text recogniser used twice by AnyText2 (``text_predictor`` and ``font_predictor``).

AnyText2 never decodes text with these copies at inference time: it feeds the 64-channel sequence
that enters the CTC classifier (the ``ctc_neck`` features, ``[N, 40, 64]``) into its line-embedding
projections. The module layout and attribute names below reproduce the original checkpoint's
state-dict keys exactly (``backbone.conv1._conv.weight``, ``neck.encoder.svtr_block.0.mixer.qkv.weight``,
``head.fc.weight`` ...), so the released weights load with ``strict=True``.

Fixed configuration (the original builds it without options): MobileNetV1-enhance backbone at
scale 0.5 with average pooling, an SVTR sequence encoder (dims 64, depth 2, hidden 120, 8 heads) and a
6625-way CTC head (6623 dictionary characters plus blank and space).

Pre-processing and the style crop live in :mod:`ocr_preprocess` and are re-exported here so that
callers can write ``neck = recognizer(prepare_recognizer_inputs(images))``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .ocr_preprocess import (
    REC_HEIGHT,
    REC_WIDTH,
    crop_image,
    position_to_mask,
    prepare_recognizer_inputs,
    unit_to_recognizer_image,
)

__all__ = [
    "CTC_CLASSES",
    "NECK_DIM",
    "NECK_LENGTH",
    "REC_HEIGHT",
    "REC_WIDTH",
    "RecModel",
    "crop_image",
    "position_to_mask",
    "prepare_recognizer_inputs",
    "unit_to_recognizer_image",
]

CTC_CLASSES = 6625
NECK_LENGTH = 40
NECK_DIM = 64

_BACKBONE_SCALE = 0.5
_SVTR_HIDDEN = 120
_SVTR_HEADS = 8
_SVTR_DEPTH = 2
_SVTR_MLP_RATIO = 2.0


class _BackboneConvBN(nn.Module):
    """Bias-free conv + BN + hard-swish; attribute names give ``_conv.*`` / ``_batch_norm.*`` keys."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int | tuple[int, int],
        padding: int,
        groups: int = 1,
    ) -> None:
        super().__init__()
        self._conv = nn.Conv2d(
            in_channels, out_channels, kernel_size, stride=stride, padding=padding, groups=groups, bias=False
        )
        self._batch_norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.hardswish(self._batch_norm(self._conv(x)))


class _SqueezeExcite(nn.Module):
    """Channel gating with a 4x reduction; gate = hard-sigmoid of a two-layer 1x1 conv on the mean."""

    def __init__(self, channels: int, reduction: int = 4) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels // reduction, 1)
        self.conv2 = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = F.adaptive_avg_pool2d(x, 1)
        gate = self.conv2(F.relu(self.conv1(gate)))
        # The plain relu6(x + 3) / 6 gate; Paddle's own SE uses a 1.2x slope, the PyTorch port does not.
        return x * F.hardsigmoid(gate)


class _DepthwiseSeparable(nn.Module):
    """Depthwise ConvBN, optional SE on the depthwise output, then pointwise ConvBN."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int | tuple[int, int],
        kernel_size: int = 3,
        use_se: bool = False,
    ) -> None:
        super().__init__()
        self._depthwise_conv = _BackboneConvBN(
            in_channels, in_channels, kernel_size, stride, padding=kernel_size // 2, groups=in_channels
        )
        if use_se:
            self._se = _SqueezeExcite(in_channels)
        self.use_se = use_se
        self._pointwise_conv = _BackboneConvBN(in_channels, out_channels, 1, 1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self._depthwise_conv(x)
        if self.use_se:
            x = self._se(x)
        return self._pointwise_conv(x)


# (in, out, depthwise stride, depthwise kernel, SE) at full width; the backbone runs at scale 0.5.
# The last block's (1, 2) stride is the original's ``last_conv_stride=[1, 2]``.
_BLOCK_PLAN: tuple[tuple[int, int, int | tuple[int, int], int, bool], ...] = (
    (32, 64, 1, 3, False),
    (64, 128, 1, 3, False),
    (128, 128, 1, 3, False),
    (128, 256, (2, 1), 3, False),
    (256, 256, 1, 3, False),
    (256, 512, (2, 1), 3, False),
    (512, 512, 1, 5, False),
    (512, 512, 1, 5, False),
    (512, 512, 1, 5, False),
    (512, 512, 1, 5, False),
    (512, 512, 1, 5, False),
    (512, 1024, (2, 1), 5, True),
    (1024, 1024, (1, 2), 5, True),
)


class _MobileNetV1Enhance(nn.Module):
    """Backbone: ``[N,3,48,320]`` -> ``[N,512,1,40]`` (height shrinks 48x, width 8x)."""

    def __init__(self, scale: float = _BACKBONE_SCALE) -> None:
        super().__init__()
        self.conv1 = _BackboneConvBN(3, int(32 * scale), 3, stride=2, padding=1)
        self.block_list = nn.Sequential(
            *(
                _DepthwiseSeparable(int(cin * scale), int(cout * scale), stride, kernel, se)
                for cin, cout, stride, kernel, se in _BLOCK_PLAN
            )
        )
        self.pool = nn.AvgPool2d(kernel_size=2, stride=2)
        self.out_channels = int(1024 * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.block_list(self.conv1(x)))


class _NeckConvBN(nn.Module):
    """Bias-free conv + BN + Swish (the original ignores its ``act`` argument here); ``conv.*``/``norm.*`` keys."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False)
        self.norm = nn.BatchNorm2d(out_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.silu(self.norm(self.conv(x)))


class _GlobalAttention(nn.Module):
    """Multi-head self-attention over all tokens; q is scaled before the dot product as in the original."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, dim = x.shape
        qkv = self.qkv(x).reshape(batch, length, 3, self.num_heads, dim // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * self.scale, qkv[1], qkv[2]
        attn = torch.softmax(q @ k.transpose(-2, -1), dim=-1)
        out = (attn @ v).permute(0, 2, 1, 3).reshape(batch, length, dim)
        return self.proj(out)


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.silu(self.fc1(x)))


class _SVTRBlock(nn.Module):
    """Pre-LN transformer block (the original's ``prenorm=False`` means norm *before* each sub-layer)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-5)
        self.mixer = _GlobalAttention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-5)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _EncoderWithSVTR(nn.Module):
    """Conv squeeze -> SVTR blocks over the 40 columns -> conv expand, fused with the backbone map."""

    def __init__(self, in_channels: int, dims: int = NECK_DIM, hidden: int = _SVTR_HIDDEN) -> None:
        super().__init__()
        self.conv1 = _NeckConvBN(in_channels, in_channels // 8, 3)
        self.conv2 = _NeckConvBN(in_channels // 8, hidden, 1)
        self.svtr_block = nn.ModuleList(
            _SVTRBlock(hidden, _SVTR_HEADS, _SVTR_MLP_RATIO) for _ in range(_SVTR_DEPTH)
        )
        self.norm = nn.LayerNorm(hidden, eps=1e-6)
        self.conv3 = _NeckConvBN(hidden, in_channels, 1)
        self.conv4 = _NeckConvBN(2 * in_channels, in_channels // 8, 3)
        self.conv1x1 = _NeckConvBN(in_channels // 8, dims, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.conv2(self.conv1(x))
        batch, channels, height, width = z.shape
        z = z.flatten(2).transpose(1, 2)
        for block in self.svtr_block:
            z = block(z)
        z = self.norm(z)
        z = z.reshape(batch, height, width, channels).permute(0, 3, 1, 2)
        z = self.conv3(z)
        return self.conv1x1(self.conv4(torch.cat((x, z), dim=1)))


class _SequenceEncoder(nn.Module):
    """Wraps the SVTR encoder (key level ``neck.encoder``) and turns the 1-high map into a sequence."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.encoder = _EncoderWithSVTR(in_channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.encoder(x)
        if x.shape[2] != 1:
            raise ValueError(
                f"recogniser feature map must be 1 pixel high before the sequence step (input height 48), "
                f"got {tuple(x.shape)}"
            )
        return x.flatten(2).transpose(1, 2)


class _CTCHead(nn.Module):
    def __init__(self, in_channels: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_channels, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


class RecModel(nn.Module):
    """The recogniser; ``forward`` returns the ``ctc_neck`` sequence ``[N, 40, 64]`` AnyText2 embeds.

    Input: ``[N, 3, 48, 320]`` from :func:`prepare_recognizer_inputs`. Use :meth:`forward_ctc` when the
    CTC logits are needed too (text-recognition losses, OCR metrics); they are raw scores, no softmax.
    """

    def __init__(self, ctc_classes: int = CTC_CLASSES) -> None:
        super().__init__()
        self.backbone = _MobileNetV1Enhance()
        self.neck = _SequenceEncoder(self.backbone.out_channels)
        self.head = _CTCHead(NECK_DIM, ctc_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(self.backbone(x))

    def forward_ctc(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(ctc_logits [N,40,classes], ctc_neck [N,40,64])`` from one pass."""
        neck = self.forward(x)
        return self.head(neck), neck
