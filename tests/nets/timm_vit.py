"""A test network this package does not ship: a vision transformer laid out as timm names it
(``patch_embed.proj``, ``blocks`` a ModuleList, fused ``attn.qkv``, ``mlp.fc1``/``fc2``), its tokens averaged
instead of a class token (``POOL = "token"`` adds one)."""
import torch
from torch import nn

IMAGE = 32
PATCH = 4
DIM = 64
DEPTH = 2
HEADS = 4
MLP_RATIO = 2  # timm's default is 4; 2 keeps the test's training time near the bundled ViT's
NUM_CLASSES = 10
POOL = "avg"


class PatchEmbed(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Conv2d(3, DIM, PATCH, stride=PATCH)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(DIM, 3 * DIM)
        self.proj = nn.Linear(DIM, DIM)

    def forward(self, x):
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, HEADS, d // HEADS).permute(2, 0, 3, 1, 4)
        a = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(a.transpose(1, 2).reshape(b, t, d))


class Mlp(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc1 = nn.Linear(DIM, MLP_RATIO * DIM)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(MLP_RATIO * DIM, DIM)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1 = nn.LayerNorm(DIM)
        self.attn = Attention()
        self.norm2 = nn.LayerNorm(DIM)
        self.mlp = Mlp()

    def forward(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    def __init__(self):
        super().__init__()
        self.patch_embed = PatchEmbed()
        n = (IMAGE // PATCH) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM)) if POOL == "token" else None
        self.pos_embed = nn.Parameter(torch.randn(1, n + (POOL == "token"), DIM) * 0.02)
        self.blocks = nn.ModuleList([Block() for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, NUM_CLASSES)

    def forward(self, x):
        t = self.patch_embed(x)
        if self.cls_token is not None:
            t = torch.cat([self.cls_token.expand(len(t), -1, -1), t], 1)
        t = t + self.pos_embed
        for b in self.blocks:
            t = b(t)
        t = self.norm(t)
        return self.head(t[:, 0] if self.cls_token is not None else t.mean(1))
