"""AllConvNet: an all-convolutional classifier, a 1x1 convolution and global pooling as its head.

No ``nn.Linear`` anywhere: the feature layer is found by a probe forward (the input of the 1x1
convolution that maps to the class channels), and its maps are pooled over space into the feature
vector. ``NUM_CLASSES`` is a module constant so a test can write a variant for another class count.
"""

from torch import nn

NUM_CLASSES = 10


class AllConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=1, stride=2), nn.BatchNorm2d(32), nn.ReLU(),
            nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1, stride=2), nn.BatchNorm2d(64), nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
        )
        self.classifier = nn.Conv2d(64, NUM_CLASSES, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x):
        return self.pool(self.classifier(self.body(x))).flatten(1)
