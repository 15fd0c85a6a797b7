"""ComposedNet: a small CNN whose classes are composed from parts, for 10, 100 and 1000 glyph classes.

The composed glyph task spells a class as the digits of two or three glyphs side by side. The net reads
each slot (the feature map pooled into ``SLOTS`` columns), scores the ten glyph shapes per slot with
one ``nn.Linear`` (the head, whose input is the feature vector), and gives class ``abc`` the logit
``log p(a) + log p(b) + log p(c)``: a fixed composition, so the net learns ten shapes per slot from
every image instead of one row per class from a handful, and trains to a 1000-class task in seconds.
The logits are log-probabilities (they sum to one over the classes after ``exp``). ``NUM_CLASSES`` is
a module constant (10, 100 or 1000) so the same file serves each class count.
"""

import torch
from torch import nn

NUM_CLASSES = 10
SLOTS = len(str(NUM_CLASSES - 1))


class ComposedNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveMaxPool2d((1, SLOTS)), nn.Flatten(),
        )
        self.head = nn.Linear(64 * SLOTS, 10 * SLOTS)
        classes = torch.arange(NUM_CLASSES)
        digits = torch.stack([(classes // 10 ** (SLOTS - 1 - j)) % 10 + 10 * j for j in range(SLOTS)], 1)
        self.register_buffer("digits", digits, persistent=False)

    def forward(self, x):
        parts = self.head(self.features(x)).view(len(x), SLOTS, 10).log_softmax(-1).flatten(1)
        return parts[:, self.digits].sum(-1)
