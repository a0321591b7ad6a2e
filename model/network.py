"""The noise-blind UViT: per-frame conv stages on the sphere, a space-time transformer at the
coarsest level, and a conv up-path with skips (Hoogeboom et al. 2023, "simple diffusion").

The network sees the noisy window only: no noise level, no time embedding, no AdaLN.
It predicts the clean window (x-prediction) through a global residual ``x_hat = z + f(z)``.

Padding on the sphere: longitude is circular; the row beyond a pole is the row next to it on
the other side of the pole, i.e. the mirrored rows rolled by half the longitudes. Wind components
change sign there (the local east and north axes reverse across a pole): the first conv, which
sees physical channels, negates them when told which channels they are.
Shapes: input/output ``(B, T, C, H, W)``; latitude ascending along H.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _pad_forward(x: Tensor, p: int, sign: Tensor | None) -> Tensor:
    H, W = x.shape[-2:]
    # one allocation and one full copy (cat + circular pad made two): the padding is ~15 % of a forward
    out = x.new_empty(*x.shape[:-2], H + 2 * p, W + 2 * p)
    out[..., p:H + p, p:W + p] = x
    top = x[..., :p, :].flip(-2).roll(W // 2, dims=-1)  # rows beyond the first latitude row
    bottom = x[..., -p:, :].flip(-2).roll(W // 2, dims=-1)
    if sign is not None:
        top, bottom = top * sign, bottom * sign
    out[..., :p, p:W + p] = top
    out[..., H + p:, p:W + p] = bottom
    out[..., :p] = out[..., W:W + p]  # circular in longitude, halo rows included
    out[..., W + p:] = out[..., p:2 * p]
    return out


class _SpherePad(torch.autograd.Function):
    """Sphere padding with a hand-written adjoint: autograd through the slice assignments of the
    forward cost ~10 % of a training step (a zero-filled buffer and a copy per slice)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, p: int, sign: Tensor | None) -> Tensor:
        ctx.p = p
        ctx.save_for_backward(sign if sign is not None else x.new_empty(0))
        return _pad_forward(x, p, sign)

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor, None, None]:
        p = ctx.p
        (sign,) = ctx.saved_tensors
        H, W = g.shape[-2] - 2 * p, g.shape[-1] - 2 * p
        gi = g[..., p:W + p].clone()  # fold the longitude halo back onto the columns it copied
        gi[..., W - p:] += g[..., :p]
        gi[..., :p] += g[..., W + p:]
        gx = gi[..., p:H + p, :].clone()  # then the pole-crossing rows onto the rows they mirror
        top, bottom = gi[..., :p, :], gi[..., H + p:, :]
        if sign.numel():
            top, bottom = top * sign, bottom * sign
        gx[..., :p, :] += top.roll(-(W // 2), dims=-1).flip(-2)
        gx[..., -p:, :] += bottom.roll(-(W // 2), dims=-1).flip(-2)
        return gx, None, None


def sphere_pad(x: Tensor, p: int, sign: Tensor | None = None) -> Tensor:
    """Pad ``(N, C, H, W)`` by ``p`` cells: pole-crossing in latitude, circular in longitude.

    ``sign`` (``(C, 1, 1)`` of +-1) multiplies the rows beyond the poles: -1 for the eastward and
    northward wind components, whose local axes reverse across a pole.
    """
    if p == 0:
        return x
    if sign is not None and sign.shape != (x.shape[-3], 1, 1):
        raise ValueError(f"sign must have shape ({x.shape[-3]}, 1, 1), got {tuple(sign.shape)}")
    return _SpherePad.apply(x, p, sign)  # type: ignore[no-any-return]


class SphereConv(nn.Module):
    """3x3 (or k x k) convolution with sphere padding; ``stride`` 2 halves both grid sizes."""

    def __init__(self, cin: int, cout: int, k: int = 3, stride: int = 1, pole_sign: Tensor | None = None) -> None:
        super().__init__()
        self.p = k // 2
        self.conv = nn.Conv2d(cin, cout, k, stride=stride, padding=0)
        self.pole_sign: Tensor | None
        self.register_buffer("pole_sign", pole_sign, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        sign = None if self.pole_sign is None else self.pole_sign.to(x.dtype)
        return self.conv(sphere_pad(x, self.p, sign))


def _groups(c: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if c % g == 0)


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, with a 1x1 skip when the width changes."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.n1 = nn.GroupNorm(_groups(cin), cin)
        self.c1 = SphereConv(cin, cout)
        self.n2 = nn.GroupNorm(_groups(cout), cout)
        self.c2 = SphereConv(cout, cout)
        nn.init.zeros_(self.c2.conv.weight)
        nn.init.zeros_(self.c2.conv.bias)  # type: ignore[arg-type]
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        h = self.c1(F.silu(self.n1(x)))
        h = self.c2(F.silu(self.n2(h)))
        return self.skip(x) + h


class TransformerBlock(nn.Module):
    """Pre-LN self-attention over all space-time tokens, then an MLP."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x: Tensor) -> Tensor:
        B, L, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(B, L, 3, self.heads, D // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v)  # (B, heads, L, D/heads)
        x = x + self.proj(a.transpose(1, 2).reshape(B, L, D))
        return x + self.mlp(self.ln2(x))


class FrameMix(nn.Module):
    """Residual mixing across the frames of a window at every pixel: ``h + W silu(norm(h))`` over the
    stacked ``(T * c)`` channels, zero-initialised (starts as the identity).

    The per-frame convolutions otherwise meet other frames only at the coarsest level (the
    transformer), so a clean context frame's fine detail could reach a generated frame only through
    that bottleneck.
    """

    def __init__(self, c: int, frames: int) -> None:
        super().__init__()
        self.frames = frames
        self.norm = nn.GroupNorm(_groups(c), c)
        self.mix = nn.Conv2d(frames * c, frames * c, 1)
        nn.init.zeros_(self.mix.weight)
        nn.init.zeros_(self.mix.bias)  # type: ignore[arg-type]

    def forward(self, h: Tensor) -> Tensor:
        BT, c, H, W = h.shape
        T = self.frames
        if BT % T:
            raise ValueError(f"FrameMix: {BT} frames in the batch are not whole windows of {T}")
        m = F.silu(self.norm(h)).reshape(BT // T, T * c, H, W)
        return h + self.mix(m).reshape(BT, c, H, W)


class UViT(nn.Module):
    """Noise-blind UViT over windows ``(B, T, C, H, W)``.

    Args:
        in_channels: physical channels C.
        frames: window length T (frame position embedding).
        grid: ``(H, W)``; both divisible by ``in_patch * 2**(len(channels)-1) * patch``.
        channels: conv widths per stage (stage 0 at full resolution).
        blocks_per_stage: ResBlocks per stage on each path.
        dim, depth, heads: transformer at the coarsest conv level.
        patch: token patch size at the coarsest level.
        in_patch: pixel-unshuffle factor applied before the first conv (1 = full resolution).
        vector_channels: input channels that are eastward/northward vector components (u, v): the
            first conv's pole-crossing halo negates them (requires ``in_patch == 1``).
        temporal_mix: after every conv stage (down and up paths) a :class:`FrameMix` mixes the frames
            at every pixel, so a generated frame can copy a clean frame's detail at full resolution
            (windows must then have exactly ``frames`` frames).
    """

    def __init__(self, in_channels: int, frames: int, grid: tuple[int, int], channels: tuple[int, ...] = (32, 64, 128),
                 blocks_per_stage: int = 1, dim: int = 256, depth: int = 4, heads: int = 4, patch: int = 1,
                 in_patch: int = 1, vector_channels: tuple[int, ...] = (), temporal_mix: bool = False) -> None:
        super().__init__()
        H, W = grid
        bad = [c for c in vector_channels if not 0 <= c < in_channels]
        if bad:
            raise ValueError(f"vector_channels {bad} outside 0..{in_channels - 1}")
        if vector_channels and in_patch != 1:
            raise ValueError("vector_channels needs in_patch == 1 (the unshuffled halo has no pole mirror)")
        self.vector_channels = tuple(int(c) for c in vector_channels)
        self.in_patch = in_patch
        H, W = H // in_patch, W // in_patch
        f = 2 ** (len(channels) - 1) * patch
        if H % f or W % f:
            raise ValueError(f"grid {grid} must be divisible by {f} (2**(stages-1) * patch)")
        self.in_channels, self.frames, self.grid, self.patch = in_channels, frames, grid, patch
        sign = None
        if self.vector_channels:
            sign = torch.ones(in_channels, 1, 1)
            sign[list(self.vector_channels)] = -1.0
        self.stem = SphereConv((in_channels) * in_patch**2, channels[0], pole_sign=sign)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        for i, c in enumerate(channels):
            self.down.append(nn.ModuleList([ResBlock(c, c) for _ in range(blocks_per_stage)]))
            if i + 1 < len(channels):
                self.downsample.append(SphereConv(c, channels[i + 1], stride=2))
        hc, wc = H // 2 ** (len(channels) - 1), W // 2 ** (len(channels) - 1)
        self.tokens_hw = (hc // patch, wc // patch)
        c_last = channels[-1]
        self.to_tokens = nn.Linear(c_last * patch * patch, dim)
        self.pos_space = nn.Parameter(torch.zeros(1, 1, self.tokens_hw[0] * self.tokens_hw[1], dim))
        self.pos_frame = nn.Parameter(torch.zeros(1, frames, 1, dim))
        nn.init.normal_(self.pos_space, std=0.02)
        nn.init.normal_(self.pos_frame, std=0.02)
        self.blocks = nn.ModuleList([TransformerBlock(dim, heads) for _ in range(depth)])
        self.ln_out = nn.LayerNorm(dim)
        self.from_tokens = nn.Linear(dim, c_last * patch * patch)
        nn.init.zeros_(self.from_tokens.weight)
        nn.init.zeros_(self.from_tokens.bias)
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        self.temporal_mix = temporal_mix
        self.mix_down = nn.ModuleList([FrameMix(c, frames) for c in channels] if temporal_mix else [])
        self.mix_up = nn.ModuleList([FrameMix(c, frames) for c in reversed(channels)] if temporal_mix else [])
        for i in reversed(range(len(channels))):
            c = channels[i]
            self.up.append(nn.ModuleList([ResBlock(2 * c if j == 0 else c, c) for j in range(blocks_per_stage)]))
            if i > 0:
                self.upsample.append(SphereConv(c, channels[i - 1]))
        self.out_norm = nn.GroupNorm(_groups(channels[0]), channels[0])
        self.out = SphereConv(channels[0], in_channels * in_patch**2)
        nn.init.zeros_(self.out.conv.weight)
        nn.init.zeros_(self.out.conv.bias)  # type: ignore[arg-type]

    def forward(self, z: Tensor) -> Tensor:
        """Clean-window estimate ``x_hat`` of shape ``(B, T, C, H, W)`` from the noisy window ``z``."""
        B, T, C, H, W = z.shape
        if (C, H, W) != (self.in_channels, *self.grid):
            raise ValueError(f"expected windows (B, T, {self.in_channels}, {self.grid[0]}, {self.grid[1]}), got {tuple(z.shape)}")
        if self.temporal_mix and T != self.frames:
            raise ValueError(f"this network mixes frames: windows must have {self.frames} frames, got {T}")
        h = z.reshape(B * T, C, H, W)
        if self.in_patch > 1:  # (B*T, C p p, H/p, W/p): T31 data are smooth at the grid scale
            h = F.pixel_unshuffle(h, self.in_patch)
        h = self.stem(h)  # per-frame convs
        skips = []
        for i, blocks in enumerate(self.down):
            for blk in blocks:  # type: ignore[attr-defined]
                h = blk(h)
            if self.temporal_mix:
                h = self.mix_down[i](h)
            skips.append(h)
            if i < len(self.downsample):
                h = self.downsample[i](h)
        h = h + self._transformer(h, B, T)
        for j, blocks in enumerate(self.up):
            h = torch.cat([h, skips.pop()], dim=1)
            for blk in blocks:  # type: ignore[attr-defined]
                h = blk(h)
            if self.temporal_mix:
                h = self.mix_up[j](h)
            if j < len(self.upsample):
                h = self.upsample[j](F.interpolate(h, scale_factor=2.0, mode="nearest"))
        out = self.out(F.silu(self.out_norm(h)))
        if self.in_patch > 1:
            out = F.pixel_shuffle(out, self.in_patch)
        return z + out.reshape(B, T, C, H, W).to(z.dtype)

    def _transformer(self, h: Tensor, B: int, T: int) -> Tensor:
        p = self.patch
        _, c, hc, wc = h.shape
        th, tw = self.tokens_hw
        tok = F.pixel_unshuffle(h, p) if p > 1 else h  # (B*T, c*p*p, th, tw)
        tok = tok.reshape(B, T, c * p * p, th * tw).transpose(2, 3)  # (B, T, L, c p p)
        x = self.to_tokens(tok) + self.pos_space + self.pos_frame[:, :T]
        x = x.reshape(B, T * th * tw, -1)  # space-time tokens
        for blk in self.blocks:
            x = blk(x)
        x = self.from_tokens(self.ln_out(x))  # (B, T*L, c p p)
        x = x.reshape(B, T, th * tw, c * p * p).transpose(2, 3).reshape(B * T, c * p * p, th, tw)
        return F.pixel_shuffle(x, p) if p > 1 else x


def count_parameters(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())
