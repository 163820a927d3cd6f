"""The Qwen3-VL vision tower (also Qwen3.5's, which has no DeepStack): pixels to placeholder embeddings.

Input is what the processor emits: `pixel_values [P, C·t·p·p]`, one row per patch, each item's rows
in merge-block order (frame, block row, block column, row in block, column in block), and `grid_thw
[n, 3]` in patches. The patch embedding is transformers' Conv3d whose kernel equals its stride, so it
is one dense linear over a row (the checkpoint's kernel is reshaped at load). Learned positions are
a square table resampled to each grid (bilinear, align-corners); the blocks are pre-norm ViT blocks
with 2-D rotary (row and column frequencies side by side) and attention only within a frame of an
item (one segment per temporal patch, as the reference's `cu_seqlens`). The merger concatenates each
2x2 group of patches into one token; DeepStack mergers do the same on the outputs of chosen blocks.
Everything runs in the model dtype except the rotary and the position weights (fp32, as the reference).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qwenrun.errors import CheckpointError
from qwenrun.vision_config import VisionConfig

_ACTIVATIONS = {"gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "gelu": F.gelu}


class VisionAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], lengths: list[int]) -> torch.Tensor:
        n = x.shape[0]
        q, k, v = self.qkv(x).view(n, 3, self.num_heads, self.head_dim).unbind(1)  # [N, heads, d] each
        q, k = _rotate(q, *rope), _rotate(k, *rope)
        # [1, heads, N, d]: with a batch axis SDPA takes its fused CPU kernel (3-D inputs fall back to
        # the math path, 15x slower in bf16 at 3072 patches)
        q, k, v = (t.transpose(0, 1)[None] for t in (q, k, v))
        out = torch.cat([F.scaled_dot_product_attention(qs, ks, vs)
                         for qs, ks, vs in zip(q.split(lengths, 2), k.split(lengths, 2), v.split(lengths, 2))], dim=2)
        return self.proj(out[0].transpose(0, 1).reshape(n, -1))


class VisionMLP(nn.Module):
    def __init__(self, dim: int, intermediate: int, act: str) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(dim, intermediate)
        self.linear_fc2 = nn.Linear(intermediate, dim)
        self.act = _ACTIVATIONS[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act(self.linear_fc1(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg.hidden_size, cfg.num_heads)
        self.mlp = VisionMLP(cfg.hidden_size, cfg.intermediate_size, cfg.hidden_act)

    def forward(self, x, rope, lengths) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), rope, lengths)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nn.Module):
    """Each 2x2 group of consecutive patch rows -> one token of `out_hidden_size`. The main merger
    normalises each patch before concatenating; DeepStack's (`postshuffle`) normalises the group."""

    def __init__(self, cfg: VisionConfig, postshuffle: bool) -> None:
        super().__init__()
        self.group = cfg.hidden_size * cfg.spatial_merge_size**2
        self.postshuffle = postshuffle
        self.norm = nn.LayerNorm(self.group if postshuffle else cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.group, self.group)
        self.linear_fc2 = nn.Linear(self.group, cfg.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x.view(-1, self.group)) if self.postshuffle else self.norm(x).view(-1, self.group)
        return self.linear_fc2(F.gelu(self.linear_fc1(x)))


class PatchEmbed(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.proj = nn.Linear(cfg.patch_dim, cfg.hidden_size)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.proj(pixels)


class VisionTower(nn.Module):
    """`forward(pixel_values, grid_thw) -> (tokens [N, out], deepstack [L, N, out])`, N = Σ t·h·w / 4,
    items in order; L = len(deepstack_visual_indexes) (0 for Qwen3.5)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.hidden_act not in _ACTIVATIONS:
            raise CheckpointError(f"vision_config.hidden_act {cfg.hidden_act!r} is not supported "
                                  f"({', '.join(_ACTIVATIONS)})")
        self.config = cfg
        self.side = int(cfg.num_position_embeddings**0.5)
        self.patch_embed = PatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg, postshuffle=False)
        self.deepstack_merger_list = nn.ModuleList(PatchMerger(cfg, postshuffle=True)
                                                   for _ in cfg.deepstack_visual_indexes)

    def forward(self, pixel_values: torch.Tensor, grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        grids = [tuple(int(v) for v in g) for g in grid_thw.tolist()]
        if pixel_values.shape != (sum(t * h * w for t, h, w in grids), self.config.patch_dim):
            raise ValueError(f"pixel_values of shape {list(pixel_values.shape)} do not match grids {grids} "
                             f"({self.config.patch_dim} values per patch)")
        m = self.config.spatial_merge_size
        bad = [g for g in grids if g[1] % m or g[2] % m]
        if bad:
            raise ValueError(f"grids {bad} are not multiples of the {m}x{m} merge")
        device = pixel_values.device
        rows, cols = _block_order_coords(grids, m, device)
        x = self.patch_embed(pixel_values.to(self.patch_embed.proj.weight.dtype))
        x = x + self._positions(grids, rows, cols).to(x.dtype)
        rope = self._rope(rows, cols)
        lengths = [h * w for t, h, w in grids for _ in range(t)]
        deepstack = []
        taps = self.config.deepstack_visual_indexes
        for i, block in enumerate(self.blocks):
            x = block(x, rope, lengths)
            if i in taps:
                deepstack.append(self.deepstack_merger_list[taps.index(i)](x))
        merged = self.merger(x)
        stack = torch.stack(deepstack) if deepstack else merged.new_empty(0, *merged.shape)
        return merged, stack

    def _positions(self, grids, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
        """The learned table resampled to each grid: bilinear with aligned corners, weights in fp32."""
        heights = torch.cat([torch.full((t * h * w,), h) for t, h, w in grids]).to(rows.device)
        widths = torch.cat([torch.full((t * h * w,), w) for t, h, w in grids]).to(rows.device)
        h_taps, h_w = _axis_taps(rows, heights, self.side)
        w_taps, w_w = _axis_taps(cols, widths, self.side)
        index = (h_taps[:, :, None] * self.side + w_taps[:, None, :]).reshape(-1, 4)
        weight = (h_w[:, :, None] * w_w[:, None, :]).reshape(-1, 4)
        return (self.pos_embed(index) * weight[:, :, None]).sum(1)

    def _rope(self, rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        head_dim = self.config.hidden_size // self.config.num_heads
        half = head_dim // 2
        inv_freq = 1.0 / (self.config.rope_theta ** (torch.arange(0, half, 2, dtype=torch.float, device=rows.device)
                                                     / half))
        freqs = torch.cat((rows[:, None].float() * inv_freq, cols[:, None].float() * inv_freq), dim=-1)
        emb = torch.cat((freqs, freqs), dim=-1)  # [N, head_dim]
        return emb.cos(), emb.sin()


def _block_order_coords(grids, m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Patch row and column of every pixel_values row (merge-block order, repeated per frame)."""
    rows, cols = [], []
    for t, h, w in grids:
        r, c = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
        shape = (h // m, m, w // m, m)
        rows.append(r.reshape(shape).transpose(1, 2).flatten().repeat(t))
        cols.append(c.reshape(shape).transpose(1, 2).flatten().repeat(t))
    return torch.cat(rows), torch.cat(cols)


def _axis_taps(index: torch.Tensor, size: torch.Tensor, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two taps (floor, floor + 1, clamped to the table) and their linear weights per target index,
    with the grid's ends on the table's ends (align_corners)."""
    src = index.float() * (side - 1) / torch.clamp(size - 1, min=1).float()
    floor = torch.floor(src)
    offsets = torch.arange(2, device=index.device)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    weights = (1 - (src[:, None] - floor[:, None] - offsets).abs()).clamp(min=0)
    return taps, weights


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half over the whole head in fp32, back to x's dtype (`apply_rotary_pos_emb_vision`)."""
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos[:, None] + torch.cat((-x2, x1), dim=-1) * sin[:, None]).to(x.dtype)


def conv_kernel_as_linear(t: torch.Tensor) -> torch.Tensor:
    """The Conv3d patch kernel `[D, C, t, p, p]` as the `[D, C·t·p·p]` linear it is (stride = kernel)."""
    return t.reshape(t.shape[0], -1)
