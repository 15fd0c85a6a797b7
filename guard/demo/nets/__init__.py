"""Model files for the demo and tests.

Each module here is a standalone *model file* in the model contract's sense (an ``nn.Module`` subclass
constructible with no arguments, importing only torch) so it can be copied next to a state_dict,
scanned and archived exactly like a model a user brings.
"""

from pathlib import Path

NETS_DIR = Path(__file__).resolve().parent


def net_file(name: str) -> Path:
    """Path of a bundled model file: ``demo_net`` (3x32x32 CNN), ``gap_net`` (BatchNorm + GAP, 1x16x16),
    ``resnet`` (CIFAR ResNet-18 layout), ``tv_resnet`` (torchvision's ResNet-18 layout, ImageNet stem: for
224x224 inputs), ``vit`` (small ViT), ``allconv`` (no Linear), ``normalized``."""
    path = NETS_DIR / f"{name}.py"
    if not path.is_file():
        raise FileNotFoundError(path)
    return path
