"""DemoNet: a small 3x32x32 CNN (three conv blocks, a two-layer head) for the glyph demo world."""

from torch import nn

NUM_CLASSES = 10


class DemoNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(),
        )
        self.fc = nn.Linear(64 * 4 * 4, 128)
        self.head = nn.Linear(128, NUM_CLASSES)

    def forward(self, x):
        return self.head(self.fc(self.features(x)).relu())
