"""HARIVO's trainable components besides the temporal layers (sec. 3.2, 3.4, 3.5, App. A, pseudo-code).

- `MappingNetwork` l^M: in front of the UNet, on the noisy latent (B, C, F, H, W).
- `FrameTokenGenerator` t_theta: (M x D) text tokens -> (F x K x D) frame-wise tokens; beside it, ours,
  `FrameTextResidual` (`harivo.frame_text=residual`): per-frame residuals on the M text states;
  `FrameTextBasis` (`harivo.frame_text=basis`): the same, a learned time basis times text terms.
- `ContrastiveHead` g_theta: h-space (mid-block output) -> z for L_DC; training only.

Where the paper's text and its pseudo-code differ we follow the pseudo-code, and say so below.
"""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import Attention
from torch import nn

from training.config import HarivoConfig


class TemporalConvBranch(nn.Module):
    """Conv1d -> SiLU -> Conv1d over frames, last conv zero-initialised (outputs zeros at init).

    The pseudo-code calls a `TemporalConv3d_Residual(query_dim)` it does not define, on a
    `(b h w) c f` tensor, i.e. a convolution over f only; the text says "3D convolutions over f, h, w".
    We follow the pseudo-code (temporal kernel). We read it as the residual *branch*: the mapping
    layer adds its input back at the end (`return h + input_x`); had the block also added its own
    input, the layer would return twice the latent at init. Its inner layout is ours.
    """

    def __init__(self, channels: int, kernel_size: int = 3):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"mapping kernel_size must be odd and positive, got {kernel_size}")
        self.conv1 = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2)
        self.act = nn.SiLU()
        self.conv2 = nn.Conv1d(channels, channels, kernel_size, padding=kernel_size // 2)
        nn.init.zeros_(self.conv2.weight)
        nn.init.zeros_(self.conv2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, F) -> (N, C, F)
        return self.conv2(self.act(self.conv1(x)))


class MappingNetwork(nn.Module):
    """l^M (HARIVO sec. 3.2, pseudo-code `MappingLayer`): maps the i.i.d. noisy latent towards video.

    Per pixel: a temporal conv branch r, then r + proj_out(attention over frames of LayerNorm(r)) with
    8 heads x 64 and a zero-initialised `proj_out`, plus the input. The
    pseudo-code keeps this layer when temporal modules are skipped (`pass_motion_module`), so the
    video model's image mode keeps it too. Identity at init (both residual branches end in zeros).
    """

    def __init__(self, channels: int, heads: int = 8, head_dim: int = 64, kernel_size: int = 3):
        super().__init__()
        self.temporal_conv = TemporalConvBranch(channels, kernel_size)
        self.temporal_norm = nn.LayerNorm(channels)
        self.temporal_attn = Attention(query_dim=channels, heads=heads, dim_head=head_dim)
        self.proj_out = nn.Linear(channels, channels)
        nn.init.zeros_(self.proj_out.weight)
        nn.init.zeros_(self.proj_out.bias)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        b, c, f, h, w = latents.shape  # (B, C, F, H, W)
        x = latents.permute(0, 3, 4, 1, 2).reshape(b * h * w, c, f)  # (B H W, C, F)
        x = self.temporal_conv(x)
        x = x.transpose(1, 2)  # (B H W, F, C)
        out = self.proj_out(self.temporal_attn(self.temporal_norm(x))) + x  # (B H W, F, C)
        out = out.reshape(b, h, w, f, c).permute(0, 4, 3, 1, 2)  # (B, C, F, H, W)
        return out + latents


class FrameTokenGenerator(nn.Module):
    """t_theta: (B, M, D) text tokens -> (B, F, K, D) frame-wise tokens (HARIVO sec. 3.5, `Frame_wise_token`).

    Layers exactly as the pseudo-code: Linear+SiLU, SiLU (the pseudo-code applies SiLU twice here),
    Conv1d over the M token positions to K*F channels (kernel 1, no bias), SiLU, 3 x (Linear+SiLU).
    The Conv1d ties the generator to the F it was built for.
    """

    def __init__(
        self, text_dim: int, max_text_len: int = 77, tokens_per_frame: int = 3, num_frames: int = 24
    ):
        super().__init__()
        self.num_frames = num_frames
        self.tokens_per_frame = tokens_per_frame
        self.max_text_len = max_text_len

        def linear_silu() -> nn.Sequential:
            return nn.Sequential(nn.Linear(text_dim, text_dim), nn.SiLU())

        self.layers = nn.Sequential(
            linear_silu(),
            nn.SiLU(),
            nn.Conv1d(max_text_len, tokens_per_frame * num_frames, kernel_size=1, bias=False),
            nn.SiLU(),
            linear_silu(),
            linear_silu(),
            linear_silu(),
        )

    def forward(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        b, m, d = encoder_hidden_states.shape  # (B, M, D)
        if m != self.max_text_len:
            raise ValueError(f"frame-token generator expects {self.max_text_len} text tokens, got {m}")
        tokens = self.layers(encoder_hidden_states)  # (B, F K, D)
        return tokens.reshape(b, self.num_frames, self.tokens_per_frame, d)  # (B, F, K, D)


class _CaptionStates(nn.Module):
    """What both of our per-frame text modules read: each state projected with the caption's mean, W_s e_m + W_c
    mean(e) (`previous`: + W_p e_(m-1), the state before it, zeros before the first), and a two-layer MLP on it
    whose last layer is zero-initialised (at init: the base's own text).

    With the state before it, a word is read with its neighbour ("to right" against "to left"), so word order
    alone can set a direction: "from left to right" / "from right to left" hold the same words, and the world's
    text tower keeps their order weakly (`shapes.text.word_sensitivity` 0.17). On P14's frozen base, trained on
    the six motions mixed, the basis with it told left from right after 200-300 steps and without it not in 300
    (docs/shapes/pilots.md, D7)."""

    def __init__(self, text_dim: int, previous: bool = False):
        super().__init__()
        self.state = nn.Linear(text_dim, text_dim)
        self.context = nn.Linear(text_dim, text_dim, bias=False)
        self.previous = nn.Linear(text_dim, text_dim, bias=False) if previous else None

    @staticmethod
    def zero_out_mlp(text_dim: int, out_dim: int) -> nn.Sequential:
        mlp = nn.Sequential(nn.SiLU(), nn.Linear(text_dim, text_dim), nn.SiLU(), nn.Linear(text_dim, out_dim))
        nn.init.zeros_(mlp[-1].weight)
        nn.init.zeros_(mlp[-1].bias)
        return mlp

    def project(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        """(B, M, D) -> W_s e_m + W_c mean(e) [+ W_p e_(m-1)] (B, M, D)."""
        e = encoder_hidden_states
        x = self.state(e) + self.context(e.mean(1, keepdim=True))
        if self.previous is not None:
            x = x + self.previous(nn.functional.pad(e, (0, 0, 1, 0))[:, :-1])  # e_(m-1), zeros at m = 0
        return x


class FrameTextResidual(_CaptionStates):
    """Ours, `harivo.frame_text=residual`: (B, M, D) text states -> (B, F, M, D) per-frame residuals on them.

    Each state m of frame f: SiLU(W_s e_m + W_c mean(e) + p_f) -> Linear+SiLU -> Linear (zero-initialised),
    p_f a learned frame embedding. Where HARIVO's K appended tokens compete with M caption states for the frozen
    cross-attention, this moves the states themselves (at init by zero: the base's own text).

    p_f starts at unit scale, as large as the projected text (`W_s e_m`'s elements are ~0.6 for unit-scale
    states): at 1/sqrt(D) the frames' inputs differed by a few percent, and on the frozen base the module's
    frame-to-frame output stayed ~0.1 of what the states a clip passes through differ by (docs/shapes/pilots.md,
    D5)."""

    def __init__(self, text_dim: int, num_frames: int, previous: bool = False):
        super().__init__(text_dim, previous)
        self.num_frames = num_frames
        self.frame_embedding = nn.Parameter(torch.randn(num_frames, text_dim))
        self.mlp = self.zero_out_mlp(text_dim, text_dim)

    def forward(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        x = self.project(encoder_hidden_states)  # (B, M, D)
        x = x[:, None] + self.frame_embedding[None, :, None].to(x.dtype)  # (B, F, M, D)
        return self.mlp(x)  # (B, F, M, D)


class FrameTextBasis(_CaptionStates):
    """Ours, `harivo.frame_text=basis`: (B, M, D) text states -> (B, F, M, D) per-frame residuals on them, each a
    product of a time term and a text term: r_f = sum_k P_fk H_k(e), with H (B, M, K, D) = MLP(W_s e_m + W_c
    mean(e)) (last layer zero-initialised: the base's own text at init) and P (F, K) learned, initialised to the
    first K Legendre polynomials of the frame's time in [-1, 1] (constant, linear, quadratic, cubic).

    Where `FrameTextResidual` must learn how a word and a frame interact inside its MLP, here a caption's word only
    has to set the sign of a trend (H_1) for the frames to follow it: on P14's frozen base, trained on the six
    motions mixed, it learned up from down in 100-200 steps and the residual had not in 300 (docs/shapes/pilots.md,
    D6)."""

    def __init__(self, text_dim: int, num_frames: int, num_basis: int = 4, previous: bool = False):
        super().__init__(text_dim, previous)
        self.num_frames, self.num_basis = num_frames, num_basis
        self.mlp = self.zero_out_mlp(text_dim, num_basis * text_dim)
        tau = torch.linspace(-1, 1, num_frames, dtype=torch.float64)
        self.basis = nn.Parameter(legendre(tau, num_basis).float())  # (F, K)

    def forward(self, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        h = self.mlp(self.project(encoder_hidden_states)).unflatten(-1, (self.num_basis, -1))  # (B, M, K, D)
        return torch.einsum("fk,bmkd->bfmd", self.basis.to(h.dtype), h)  # (B, F, M, D)


def legendre(tau: torch.Tensor, n: int) -> torch.Tensor:
    """(len(tau), n): the Legendre polynomials P_0 .. P_{n-1} at `tau` (Bonnet's recursion)."""
    out = [torch.ones_like(tau), tau][:n]
    for k in range(1, n - 1):
        out.append(((2 * k + 1) * tau * out[k] - k * out[k - 1]) / (k + 1))
    return torch.stack(out, dim=1)


def frame_text_generator(
    kind: str,
    text_dim: int,
    max_text_len: int,
    tokens_per_frame: int,
    num_frames: int,
    previous: bool = False,
) -> nn.Module:
    """The module `harivo.frame_text` names: HARIVO's `FrameTokenGenerator`, our `FrameTextResidual` or our
    `FrameTextBasis` (`previous`: ours read each state with the one before it)."""
    if kind == "tokens":
        return FrameTokenGenerator(text_dim, max_text_len, tokens_per_frame, num_frames)
    if kind == "residual":
        return FrameTextResidual(text_dim, num_frames, previous)
    if kind == "basis":
        return FrameTextBasis(text_dim, num_frames, previous=previous)
    raise ValueError(f"harivo.frame_text must be tokens, residual or basis, got {kind!r}")


def harivo_modules(
    harivo: HarivoConfig, in_channels: int, text_dim: int, max_text_len: int, num_frames: int
) -> tuple[MappingNetwork | None, nn.Module | None]:
    """The mapping network and frame-text module `harivo` turns on (None when off; built in this order, and only
    when on, so a seeded init does not move)."""
    mapping = None
    if harivo.mapping_network:
        h = harivo
        mapping = MappingNetwork(in_channels, h.mapping_heads, h.mapping_head_dim, h.mapping_kernel_size)
    frame_text = None
    if harivo.frame_tokens:
        k = harivo.tokens_per_frame
        frame_text = frame_text_generator(
            harivo.frame_text, text_dim, max_text_len, k, num_frames, harivo.frame_text_previous
        )
    return mapping, frame_text


class ContrastiveHead(nn.Module):
    """g_theta (HARIVO sec. 3.4, `Contrastive_projection`): h-space (N, ch, s, s) -> z (N, ch).

    Conv2d(ch, ch, kernel = s = latent_size / downsampling, no bias) collapses the map to 1 x 1, then
    SiLU, Flatten and three Linear(ch, ch) with SiLU between. The text's "(c h w) -> c -> c -> c" MLP
    is the same map (a full-size conv is a linear layer on the flattened map).
    """

    def __init__(self, channels: int, spatial_size: int):
        super().__init__()
        self.spatial_size = spatial_size
        self.layers = nn.Sequential(
            nn.Conv2d(channels, channels, kernel_size=spatial_size, stride=1, padding=0, bias=False),
            nn.SiLU(),
            nn.Flatten(),
            nn.Linear(channels, channels),
            nn.SiLU(),
            nn.Linear(channels, channels),
            nn.SiLU(),
            nn.Linear(channels, channels),
        )

    def forward(self, hspace: torch.Tensor) -> torch.Tensor:
        if hspace.shape[-2:] != (self.spatial_size, self.spatial_size):
            raise ValueError(
                f"contrastive head was built for a {self.spatial_size}x{self.spatial_size} h-space "
                f"(model.latent_size), got {tuple(hspace.shape[-2:])}"
            )
        return self.layers(hspace)  # (N, ch)
