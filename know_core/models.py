"""Small image classifiers that the pipeline records and enhances.

Every model is a plain `nn.Module` with the same contract, so the training loop, the
downstream protocol and KNOW prediction never special-case an architecture:

    forward_features(x) -> (N, F)   pre-head features (used by the linear probe)
    head: nn.Linear                  the classifier, replaced downstream
    forward(x) = head(forward_features(x))

Example:
    >>> import torch
    >>> m = build_model("resnet", in_channels=1, num_classes=5, image_size=28, width=24)
    >>> m(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 5])
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

import torch
from torch import nn
import torch.nn.functional as F


class _Classifier(nn.Module):
    head: nn.Linear

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(x))


class SimpleCNN(_Classifier):
    """The release's 'SimpleNet': 4 x (conv3x3 'same' + ReLU + maxpool), Dense(64), Dense(classes).

    Pooling stops once the feature map is 1x1, so the net also fits 8x8 digits.
    """

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int = 8):
        super().__init__()
        chans = [in_channels, width, 2 * width, 4 * width, 4 * width]
        layers: list[nn.Module] = []
        size = image_size
        for c_in, c_out in zip(chans[:-1], chans[1:]):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.ReLU()]
            if size >= 2:  # Keras MaxPool2D floors; skip once the map is 1x1
                layers.append(nn.MaxPool2d(2))
                size //= 2
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(chans[-1] * size * size, 64)
        self.head = nn.Linear(64, num_classes)

    def forward_features(self, x):
        return F.relu(self.fc(self.features(x).flatten(1)))


class MLP(_Classifier):
    """Two hidden ReLU layers on flattened pixels."""

    def __init__(self, in_channels: int, num_classes: int, image_size: int, width: int = 128):
        super().__init__()
        self.fc1 = nn.Linear(in_channels * image_size * image_size, width)
        self.fc2 = nn.Linear(width, width)
        self.head = nn.Linear(width, num_classes)

    def forward_features(self, x):
        return F.relu(self.fc2(F.relu(self.fc1(x.flatten(1)))))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:  # 1x1 projection when the shape changes
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(_Classifier):
    """CIFAR-style ResNet with BatchNorm.

    `blocks` gives the number of basic blocks per stage; stage s has width * 2**s channels.
    `stem_stride=2` halves the input first (28x28 -> 14x14), which is what makes the
    default ~170k-parameter net cheap enough for a 2-core CPU.
    ResNet-18 is blocks=(2, 2, 2, 2), width=64, stem_stride=1 (11.2M parameters).
    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        image_size: int = 32,
        width: int = 24,
        blocks: tuple[int, ...] = (1, 1, 1),
        stem_stride: int = 2,
    ):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, width, 3, stem_stride, 1, bias=False)
        self.bn = nn.BatchNorm2d(width)
        stages, c_in = [], width
        for s, n in enumerate(blocks):
            c_out = width * 2**s
            for b in range(n):
                stages.append(BasicBlock(c_in, c_out, stride=2 if (s > 0 and b == 0) else 1))
                c_in = c_out
        self.layers = nn.Sequential(*stages)
        self.head = nn.Linear(c_in, num_classes)

    def forward_features(self, x):
        out = self.layers(F.relu(self.bn(self.stem(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model class for a stored run."""

    name: str  # key of MODELS
    in_channels: int
    num_classes: int
    image_size: int
    width: int | None = None  # None: the architecture's default


MODELS = {
    "simple-cnn": lambda c, k, s, w: SimpleCNN(c, k, s, width=w or 8),
    "mlp": lambda c, k, s, w: MLP(c, k, s, width=w or 128),
    "resnet": lambda c, k, s, w: ResNet(c, k, s, width=w or 24),
    "resnet18": lambda c, k, s, w: ResNet(c, k, s, width=w or 64, blocks=(2, 2, 2, 2), stem_stride=1),
}


def build_model(
    name: str, in_channels: int, num_classes: int, image_size: int, width: int | None = None
) -> nn.Module:
    """Build a model by registry name; an unknown name is a one-line ValueError."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose one of: {', '.join(MODELS)}")
    return MODELS[name](in_channels, num_classes, image_size, width)


def build_from_spec(spec: ModelSpec) -> nn.Module:
    return build_model(spec.name, spec.in_channels, spec.num_classes, spec.image_size, spec.width)


# torch's default generator is process-global: building seeded models from several threads
# at once (a thread-pool fan-out) would interleave their draws, so builds are serialised.
_INIT_LOCK = threading.Lock()


def build_seeded(spec: ModelSpec, seed: int) -> nn.Module:
    """Build a model whose initial weights depend only on `seed`, safe under threads."""
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_from_spec(spec)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
