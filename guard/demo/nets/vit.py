"""TinyViT: a small vision transformer (patch embedding, class token, LayerNorm, head ``head``).

The feature vector is the class token after the final LayerNorm (the input of ``head``). There is no
spatial block after the patch embedding, so the inner-layer checks read the first block's tokens
(:func:`guard.model.inner_layer`).
"""

import torch
from torch import nn

IMAGE = 32
PATCH = 4
DIM = 64
DEPTH = 4
HEADS = 4
NUM_CLASSES = 10


class Block(nn.Module):
    def __init__(self, dim=DIM, heads=HEADS):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x):
        h = self.norm1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        return x + self.mlp(self.norm2(x))


class TinyViT(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = nn.Conv2d(3, DIM, PATCH, stride=PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos_embed = nn.Parameter(torch.randn(1, (IMAGE // PATCH) ** 2 + 1, DIM) * 0.02)
        self.blocks = nn.Sequential(*[Block() for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, NUM_CLASSES)

    def forward(self, x):
        t = self.patch_embed(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], 1) + self.pos_embed
        t = self.norm(self.blocks(t))
        return self.head(t[:, 0])
