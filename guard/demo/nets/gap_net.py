"""GapNet: BatchNorm, global average pooling and a head named ``classifier``, for 1x16x16 digits.

A second architecture so nothing in guard silently assumes the demo net's shape: another input size
and channel count, normalisation layers whose running statistics must not change, global pooling
(where a backdoor fires wherever its pattern sits) and another head name.
"""

from torch import nn


class GapNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.classifier = nn.Linear(64, 10)

    def forward(self, x):
        return self.classifier(self.body(x))
