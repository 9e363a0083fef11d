"""MPRNet: Multi-Stage Progressive Image Restoration (Zamir et al., CVPR 2021).

One file, one network. Module and parameter names follow the paper's figure and the released
checkpoints, so the reference's state_dicts load unchanged (``models/checkpoint.py`` infers the
constructor values from them).

The network sees its input three ways:

* stage 1 cuts the image into four quadrants and runs an encoder-decoder on each;
* stage 2 cuts it into two halves (top, bottom), fusing stage-1 features in (cross-stage
  feature fusion, CSFF) and taking stage 1's output through a supervised attention module (SAM);
* stage 3 works at full resolution with no down-sampling (the original-resolution subnetwork,
  ORSNet), fed by stage 2's encoder and decoder features and its SAM.

Height and width must be multiples of 8: the quadrants are down-sampled twice.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MPRNet", "LOCAL_SHARE", "grid_window_means", "spread"]


def conv(in_channels: int, out_channels: int, kernel_size: int, bias: bool = False) -> nn.Conv2d:
    """'Same'-padded convolution, the only kind MPRNet uses."""
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=bias)


# How much of a locally pooling attention's gate comes from its window rather than its whole input.
# Half and half, not tuned: with windows alone (exact per-pixel windows, before the grid; 4 photos)
# the bundled deblurrer, trained on whole 128 px crops, gained most on blur that changes across the
# frame but lost 0.39 dB on arcs, which does not, where a whole 500 px photo estimates one blur
# better than any window. Half and half, on the first 8 Kodak24 photos: camera roll +0.48 dB, zoom
# +0.24, uniform blur -0.20 dB at worst (TRAINING_LOG.md, twenty-eighth session; not shipped).
LOCAL_SHARE = 0.5


def grid_window_means(x: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, int]:
    """Means of ``x`` over windows of about ``rows`` x ``cols`` (cut off at its borders), on a grid
    of square cells an eighth of the window's shorter side: returns the grid of means and the
    cell's side, so :func:`spread` can bring whatever is computed from them back to full size. A
    window's mean barely changes over an eighth of its width, and the grid keeps its cost, and
    that of anything computed from it, a small fraction of the convolutions around it.

    Only fixed-size pooling, no branch on the input's size, so one traced graph (ONNX, OpenVINO)
    serves every size. No cast to fp32 for bf16 or fp16 inputs: PyTorch's average pooling sums
    them in fp32 (on the CPU, bf16 means of 64 x 64 windows of values near 1.5 came within one bf16
    step, 0.0045, of fp32's).
    """
    cell = max(1, min(rows, cols) // 8)
    cells = F.avg_pool2d(x, cell, ceil_mode=True) if cell > 1 else x
    # Odd, so each window is centred on its cell.
    kernel = (2 * (rows // cell // 2) + 1, 2 * (cols // cell // 2) + 1)
    means = F.avg_pool2d(cells, kernel, stride=1, padding=(kernel[0] // 2, kernel[1] // 2), count_include_pad=False)
    return means, cell


def spread(grid: torch.Tensor, cell: int, height: int, width: int) -> torch.Tensor:
    """A grid of :func:`grid_window_means` back to ``height`` x ``width``, bilinearly."""
    if cell == 1:
        return grid
    return F.interpolate(grid, scale_factor=cell, mode="bilinear", align_corners=False)[..., :height, :width]


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation: rescale each channel by a gate computed from global pooling.

    The paper pools the whole input. A network trained on crops and run on whole photos then
    computes its gates from far larger regions than it learnt them on, and one gate for all of a
    photo whose degradation changes across the frame. ``window`` (rows, cols), set by
    :meth:`MPRNet.pool_attention_locally`, mixes in a mean over that region around each position
    (:data:`LOCAL_SHARE`, :func:`grid_window_means`).

    Args:
        channels (int): feature channels.
        reduction (int): the bottleneck has ``channels // reduction`` channels.
        bias (bool): bias in the two 1x1 convolutions.
    """

    def __init__(self, channels: int, reduction: int = 4, bias: bool = False):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.conv_du = nn.Sequential(
            nn.Conv2d(channels, channels // reduction, 1, bias=bias),
            nn.ReLU(inplace=True),
            nn.Conv2d(channels // reduction, channels, 1, bias=bias),
            nn.Sigmoid(),
        )
        self.window: tuple[int, int] | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        whole = self.pool(x)
        if self.window is None:
            return x * self.conv_du(whole)
        # The gate is computed on the grid and spread: the bottleneck at every pixel would cost as
        # much as the block's convolutions, for a gate that changes as slowly as the windows' means.
        means, cell = grid_window_means(x, *self.window)
        gate = self.conv_du(LOCAL_SHARE * means + (1 - LOCAL_SHARE) * whole)
        return x * spread(gate, cell, x.shape[-2], x.shape[-1])


class CAB(nn.Module):
    """Channel attention block: conv-act-conv, channel attention, residual.

    Args:
        channels (int): feature channels.
        kernel_size (int): convolution kernel size.
        reduction (int): channel-attention reduction.
        bias (bool): bias in the convolutions.
        act (nn.Module): activation; MPRNet passes one PReLU shared by the whole network.
    """

    def __init__(self, channels: int, kernel_size: int, reduction: int, bias: bool, act: nn.Module):
        super().__init__()
        # Registered before `body` so that state_dict order matches the released checkpoints.
        self.CA = ChannelAttention(channels, reduction, bias)
        self.body = nn.Sequential(
            conv(channels, channels, kernel_size, bias),
            act,
            conv(channels, channels, kernel_size, bias),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.CA(self.body(x)) + x


def cab_stack(n: int, channels: int, kernel_size: int, reduction: int, bias: bool, act: nn.Module) -> nn.Sequential:
    return nn.Sequential(*(CAB(channels, kernel_size, reduction, bias, act) for _ in range(n)))


class DownSample(nn.Module):
    """Halve the resolution (bilinear) and widen by ``extra_channels`` (1x1 conv)."""

    def __init__(self, channels: int, extra_channels: int):
        super().__init__()
        self.down = nn.Sequential(
            nn.Upsample(scale_factor=0.5, mode="bilinear", align_corners=False),
            nn.Conv2d(channels, channels + extra_channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(x)


class UpSample(nn.Module):
    """Double the resolution (bilinear) and narrow from ``channels + extra_channels`` to ``channels``."""

    def __init__(self, channels: int, extra_channels: int):
        super().__init__()
        self.up = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            nn.Conv2d(channels + extra_channels, channels, 1, bias=False),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(x)


class SkipUpSample(UpSample):
    """UpSample followed by adding the encoder's skip connection."""

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.up(x) + skip


class Encoder(nn.Module):
    """Three-level U-Net encoder of CABs; widths n, n+s, n+2s.

    With ``csff`` (stage 2) it adds 1x1-projected stage-1 encoder and decoder features at each
    level: the cross-stage feature fusion that lets stage 2 start from what stage 1 learnt.
    """

    def __init__(self, n_feat: int, kernel_size: int, reduction: int, act: nn.Module, bias: bool,
                 scale_unetfeats: int, csff: bool):
        super().__init__()
        widths = [n_feat + i * scale_unetfeats for i in range(3)]
        self.encoder_level1 = cab_stack(2, widths[0], kernel_size, reduction, bias, act)
        self.encoder_level2 = cab_stack(2, widths[1], kernel_size, reduction, bias, act)
        self.encoder_level3 = cab_stack(2, widths[2], kernel_size, reduction, bias, act)
        self.down12 = DownSample(widths[0], scale_unetfeats)
        self.down23 = DownSample(widths[1], scale_unetfeats)
        self.csff = csff
        if csff:
            for i, width in enumerate(widths, start=1):
                setattr(self, f"csff_enc{i}", nn.Conv2d(width, width, 1, bias=bias))
            for i, width in enumerate(widths, start=1):
                setattr(self, f"csff_dec{i}", nn.Conv2d(width, width, 1, bias=bias))

    def _fuse(self, level: int, x: torch.Tensor, encoder_outs, decoder_outs) -> torch.Tensor:
        if encoder_outs is None or decoder_outs is None:
            return x
        i = level - 1
        return (x + getattr(self, f"csff_enc{level}")(encoder_outs[i])
                + getattr(self, f"csff_dec{level}")(decoder_outs[i]))

    def forward(self, x, encoder_outs=None, decoder_outs=None) -> list[torch.Tensor]:
        enc1 = self._fuse(1, self.encoder_level1(x), encoder_outs, decoder_outs)
        enc2 = self._fuse(2, self.encoder_level2(self.down12(enc1)), encoder_outs, decoder_outs)
        enc3 = self._fuse(3, self.encoder_level3(self.down23(enc2)), encoder_outs, decoder_outs)
        return [enc1, enc2, enc3]


class Decoder(nn.Module):
    """Three-level U-Net decoder; skip connections pass through a CAB before they are added."""

    def __init__(self, n_feat: int, kernel_size: int, reduction: int, act: nn.Module, bias: bool,
                 scale_unetfeats: int):
        super().__init__()
        widths = [n_feat + i * scale_unetfeats for i in range(3)]
        self.decoder_level1 = cab_stack(2, widths[0], kernel_size, reduction, bias, act)
        self.decoder_level2 = cab_stack(2, widths[1], kernel_size, reduction, bias, act)
        self.decoder_level3 = cab_stack(2, widths[2], kernel_size, reduction, bias, act)
        self.skip_attn1 = CAB(widths[0], kernel_size, reduction, bias, act)
        self.skip_attn2 = CAB(widths[1], kernel_size, reduction, bias, act)
        self.up21 = SkipUpSample(widths[0], scale_unetfeats)
        self.up32 = SkipUpSample(widths[1], scale_unetfeats)

    def forward(self, encoder_outs: list[torch.Tensor]) -> list[torch.Tensor]:
        enc1, enc2, enc3 = encoder_outs
        dec3 = self.decoder_level3(enc3)
        dec2 = self.decoder_level2(self.up32(dec3, self.skip_attn2(enc2)))
        dec1 = self.decoder_level1(self.up21(dec2, self.skip_attn1(enc1)))
        return [dec1, dec2, dec3]


class SAM(nn.Module):
    """Supervised attention module.

    Predicts the stage's restored image (supervised by the loss) and turns it into an attention
    map that gates the features handed to the next stage.

    Args:
        n_feat (int): feature channels.
        kernel_size (int): kernel of its three convolutions (MPRNet uses 1).
        bias (bool): bias in the convolutions.
        image_channels (int): channels of the restored image.
    """

    def __init__(self, n_feat: int, kernel_size: int = 1, bias: bool = False, image_channels: int = 3):
        super().__init__()
        self.conv1 = conv(n_feat, n_feat, kernel_size, bias)
        self.conv2 = conv(n_feat, image_channels, kernel_size, bias)
        self.conv3 = conv(image_channels, n_feat, kernel_size, bias)

    def forward(self, x: torch.Tensor, degraded: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        restored = self.conv2(x) + degraded
        attention = torch.sigmoid(self.conv3(restored))
        return self.conv1(x) * attention + x, restored


class ORB(nn.Module):
    """Original-resolution block: ``num_cab`` CABs and a convolution, with a residual."""

    def __init__(self, channels: int, kernel_size: int, reduction: int, act: nn.Module, bias: bool, num_cab: int):
        super().__init__()
        self.body = nn.Sequential(
            *(CAB(channels, kernel_size, reduction, bias, act) for _ in range(num_cab)),
            conv(channels, channels, kernel_size, bias),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + x


class ORSNet(nn.Module):
    """Original-resolution subnetwork (stage 3): three ORBs at full resolution.

    After each ORB it adds stage 2's encoder and decoder features of one U-Net level, brought up
    to full resolution and projected to its width.
    """

    def __init__(self, n_feat: int, scale_orsnetfeats: int, kernel_size: int, reduction: int, act: nn.Module,
                 bias: bool, scale_unetfeats: int, num_cab: int):
        super().__init__()
        width = n_feat + scale_orsnetfeats
        self.orb1 = ORB(width, kernel_size, reduction, act, bias, num_cab)
        self.orb2 = ORB(width, kernel_size, reduction, act, bias, num_cab)
        self.orb3 = ORB(width, kernel_size, reduction, act, bias, num_cab)
        self.up_enc1 = UpSample(n_feat, scale_unetfeats)
        self.up_dec1 = UpSample(n_feat, scale_unetfeats)
        self.up_enc2 = nn.Sequential(UpSample(n_feat + scale_unetfeats, scale_unetfeats),
                                     UpSample(n_feat, scale_unetfeats))
        self.up_dec2 = nn.Sequential(UpSample(n_feat + scale_unetfeats, scale_unetfeats),
                                     UpSample(n_feat, scale_unetfeats))
        for name in ("conv_enc1", "conv_enc2", "conv_enc3", "conv_dec1", "conv_dec2", "conv_dec3"):
            setattr(self, name, nn.Conv2d(n_feat, width, 1, bias=bias))

    def forward(self, x: torch.Tensor, encoder_outs: list[torch.Tensor],
                decoder_outs: list[torch.Tensor]) -> torch.Tensor:
        x = self.orb1(x) + self.conv_enc1(encoder_outs[0]) + self.conv_dec1(decoder_outs[0])
        x = self.orb2(x) + self.conv_enc2(self.up_enc1(encoder_outs[1])) + self.conv_dec2(self.up_dec1(decoder_outs[1]))
        x = self.orb3(x) + self.conv_enc3(self.up_enc2(encoder_outs[2])) + self.conv_dec3(self.up_dec2(decoder_outs[2]))
        return x


def _cat_levels(first: list[torch.Tensor], second: list[torch.Tensor], dim: int) -> list[torch.Tensor]:
    return [torch.cat((a, b), dim) for a, b in zip(first, second)]


class MPRNet(nn.Module):
    """MPRNet from "Multi-Stage Progressive Image Restoration" (Zamir et al., CVPR 2021).

    The defaults are the released deraining configuration; deblurring uses ``n_feat=96,
    scale_unetfeats=48, scale_orsnetfeats=32`` and denoising ``n_feat=80, scale_unetfeats=48,
    scale_orsnetfeats=32``.

    Args:
        in_c (int): input image channels.
        out_c (int): output image channels (must equal ``in_c``: the output is a residual).
        n_feat (int): feature width of stages 1 and 2 at full resolution.
        scale_unetfeats (int): extra width per U-Net level.
        scale_orsnetfeats (int): extra width of the original-resolution subnetwork.
        num_cab (int): CABs per original-resolution block.
        kernel_size (int): convolution kernel size.
        reduction (int): channel-attention reduction.
        bias (bool): bias in the convolutions.

    ``forward`` takes an (N, in_c, H, W) batch with H and W multiples of 8 and returns the three
    stage outputs ``[stage3, stage2, stage1]``; ``stage3`` is the restored image (unclamped).
    """

    def __init__(self, in_c: int = 3, out_c: int = 3, n_feat: int = 40, scale_unetfeats: int = 20,
                 scale_orsnetfeats: int = 16, num_cab: int = 8, kernel_size: int = 3, reduction: int = 4,
                 bias: bool = False):
        super().__init__()
        if in_c != out_c:
            raise ValueError(f"MPRNet restores residually, so in_c must equal out_c (got {in_c} and {out_c})")
        # One PReLU for the whole network, as in the released models: its single slope is listed
        # in the state_dict under every block that uses it.
        act = nn.PReLU()
        self.shallow_feat1 = nn.Sequential(conv(in_c, n_feat, kernel_size, bias),
                                           CAB(n_feat, kernel_size, reduction, bias, act))
        self.shallow_feat2 = nn.Sequential(conv(in_c, n_feat, kernel_size, bias),
                                           CAB(n_feat, kernel_size, reduction, bias, act))
        self.shallow_feat3 = nn.Sequential(conv(in_c, n_feat, kernel_size, bias),
                                           CAB(n_feat, kernel_size, reduction, bias, act))
        self.stage1_encoder = Encoder(n_feat, kernel_size, reduction, act, bias, scale_unetfeats, csff=False)
        self.stage1_decoder = Decoder(n_feat, kernel_size, reduction, act, bias, scale_unetfeats)
        self.stage2_encoder = Encoder(n_feat, kernel_size, reduction, act, bias, scale_unetfeats, csff=True)
        self.stage2_decoder = Decoder(n_feat, kernel_size, reduction, act, bias, scale_unetfeats)
        self.stage3_orsnet = ORSNet(n_feat, scale_orsnetfeats, kernel_size, reduction, act, bias,
                                    scale_unetfeats, num_cab)
        self.sam12 = SAM(n_feat, kernel_size=1, bias=bias, image_channels=in_c)
        self.sam23 = SAM(n_feat, kernel_size=1, bias=bias, image_channels=in_c)
        self.concat12 = conv(n_feat * 2, n_feat, kernel_size, bias)
        self.concat23 = conv(n_feat * 2, n_feat + scale_orsnetfeats, kernel_size, bias)
        self.tail = conv(n_feat + scale_orsnetfeats, out_c, kernel_size, bias)
        self.attention_patch: int | None = None  # see pool_attention_locally

    def pool_attention_locally(self, patch: int | None) -> None:
        """Make every channel attention pool over a region the size of what it pooled whole when the
        network ran on ``patch`` x ``patch`` crops (for stage 1's deepest level, a quadrant down-
        sampled twice: ``patch // 8`` square), mixed with its whole input; None: the whole input
        only, as the paper.

        Stored on the network, not in its weights: checkpoints record it beside the tensors
        (``models.checkpoint``), since weights trained with one pooling expect it at run time.
        """
        if patch is not None and (patch <= 0 or patch % 8):
            raise ValueError(f"the attention patch must be a positive multiple of 8, got {patch}")
        layers = [module for module in self.modules() if isinstance(module, ChannelAttention)]
        for layer in layers:
            layer.window = None
        self.attention_patch = patch
        if patch is None:
            return
        # Each layer's region follows from the stages' cuts and down-sampling; running a crop
        # through the network reads it off rather than restating that arithmetic here. It runs on
        # a copy on the meta device, which computes shapes only: the crop costs no memory or time
        # however large it is (on the CPU a 512 px one took a minute and 2 GB for the released
        # deblurrer). The memo gives the copy meta tensors in place of the weights, shared ones
        # (the one PReLU) staying shared, so no weight is copied.
        memo = {id(tensor): nn.Parameter(torch.empty_like(tensor, device="meta"), requires_grad=False)
                for tensor in self.parameters()}
        memo.update({id(tensor): torch.empty_like(tensor, device="meta") for tensor in self.buffers()})
        shapes_only = copy.deepcopy(self, memo)
        copied_layers = [module for module in shapes_only.modules() if isinstance(module, ChannelAttention)]
        seen: dict[ChannelAttention, tuple[int, int]] = {}
        for copied in copied_layers:
            copied.register_forward_pre_hook(
                lambda layer, inputs: seen.setdefault(layer, tuple(inputs[0].shape[-2:])) and None)
        with torch.no_grad():
            shapes_only(torch.empty(1, self.shallow_feat1[0].in_channels, patch, patch, device="meta",
                                    dtype=next(self.parameters()).dtype))
        for layer, copied in zip(layers, copied_layers):
            layer.window = seen[copied]

    def forward(self, image: torch.Tensor) -> list[torch.Tensor]:
        height, width = image.shape[-2:]
        if height % 8 or width % 8:
            raise ValueError(f"MPRNet needs height and width divisible by 8, got {height}x{width}")
        half_h, half_w = height // 2, width // 2
        top, bottom = image[..., :half_h, :], image[..., half_h:, :]
        quadrants = [top[..., :half_w], top[..., half_w:], bottom[..., :half_w], bottom[..., half_w:]]

        # Stage 1: four quadrants; encoder features are joined side by side into halves.
        enc_tl, enc_tr, enc_bl, enc_br = (self.stage1_encoder(self.shallow_feat1(q)) for q in quadrants)
        enc1_top, enc1_bottom = _cat_levels(enc_tl, enc_tr, 3), _cat_levels(enc_bl, enc_br, 3)
        dec1_top, dec1_bottom = self.stage1_decoder(enc1_top), self.stage1_decoder(enc1_bottom)
        sam_top, stage1_top = self.sam12(dec1_top[0], top)
        sam_bottom, stage1_bottom = self.sam12(dec1_bottom[0], bottom)
        stage1_image = torch.cat((stage1_top, stage1_bottom), 2)

        # Stage 2: two halves, fused with stage 1's features and SAM output.
        x_top = self.concat12(torch.cat((self.shallow_feat2(top), sam_top), 1))
        x_bottom = self.concat12(torch.cat((self.shallow_feat2(bottom), sam_bottom), 1))
        enc2 = _cat_levels(self.stage2_encoder(x_top, enc1_top, dec1_top),
                           self.stage2_encoder(x_bottom, enc1_bottom, dec1_bottom), 2)
        dec2 = self.stage2_decoder(enc2)
        sam_full, stage2_image = self.sam23(dec2[0], image)

        # Stage 3: full resolution.
        x = self.concat23(torch.cat((self.shallow_feat3(image), sam_full), 1))
        x = self.stage3_orsnet(x, enc2, dec2)
        return [self.tail(x) + image, stage2_image, stage1_image]
