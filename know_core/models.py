"""The image classifiers the pipeline records and enhances: built-in ones, and any other.

A model is named by one string (`model_factory`):

    simple-cnn | mlp | resnet | resnet18    the built-in models below
    torchvision:<name>                      torchvision.models.get_model(name), random init
    timm:<name>                             timm.create_model(name), random init (needs timm)
    package.module:callable                 the user's own factory, imported by path

Keyword arguments for the factory come as a dict (`kwargs`). Nothing else is asked of a
model than to be an `nn.Module` that maps (N, C, H, W) images to logits and has an
`nn.Linear` head: the module named by `head`, or else the last `nn.Linear` in
`named_modules()` order (`find_head`). The head's input is the model's feature vector
(`head_inputs`, a forward hook: the linear probe needs no `forward_features`); the
downstream protocol replaces the head (know_core.evaluate.replace_head).

`ModelSpec` records all that is needed to rebuild a model for stored weights, and
`spec_for_data` makes one that fits a data set: a head that does not output the data's
classes is replaced (seeded, by `build_seeded`), and grayscale images fed to a model whose
first convolution takes 3 channels are repeated along the channel axis by a forward
pre-hook (`repeat_channels`), so the state_dict stays the model's own.

The built-in models keep their own contract as well (their head is `head`, the last Linear):

    forward_features(x) -> (N, F)   pre-head features
    head: nn.Linear                  the classifier, replaced downstream
    forward(x) = head(forward_features(x))

Example:
    >>> import torch
    >>> m = build_model("resnet", in_channels=1, num_classes=5, image_size=28, width=24)
    >>> m(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 5])
    >>> find_head(m)[0]
    'head'
"""
from __future__ import annotations

import functools
import importlib
import importlib.util
import json
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterator

import torch
from torch import nn
import torch.nn.functional as F

from .errors import BadInput, one_line


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


#: the built-in models: factory(in_channels, num_classes, image_size, width, **kwargs)
MODELS: dict[str, Callable[..., nn.Module]] = {
    "simple-cnn": lambda c, k, s, w, **kw: SimpleCNN(c, k, s, width=w or 8, **kw),
    "mlp": lambda c, k, s, w, **kw: MLP(c, k, s, width=w or 128, **kw),
    "resnet": lambda c, k, s, w, **kw: ResNet(c, k, s, width=w or 24, **kw),
    "resnet18": lambda c, k, s, w, **kw: ResNet(c, k, s, **{"width": w or 64, "blocks": (2, 2, 2, 2),
                                                            "stem_stride": 1, **kw}),
}

#: how a model name may be written, for messages
MODEL_FORMS = ", ".join(MODELS) + ", torchvision:<name>, timm:<name> or package.module:callable"


# --------------------------------------------------------------------------- names


def _torchvision():
    try:
        import torchvision.models as tvm
    except ImportError:
        raise BadInput("torchvision is not installed; install it with `pip install torchvision` "
                       "(the project pins torchvision==0.28.0)") from None
    return tvm


def _timm():
    if importlib.util.find_spec("timm") is None:
        raise BadInput("timm models need the timm package: pip install timm (or pip install -e '.[timm]')")
    import timm

    return timm


def _import_callable(path: str) -> Callable[..., Any]:
    """`package.module:attr[.attr]` -> the object, or a one-line BadInput."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise BadInput(f"model {path!r}: write a factory as package.module:callable")
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - whatever the user's module raises, it is not importable
        raise BadInput(f"model {path!r}: module {module_name!r} cannot be imported ({type(e).__name__}: "
                       f"{one_line(e)}); put it on PYTHONPATH or fix it") from None
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise BadInput(f"model {path!r}: module {module_name!r} has no attribute {attr!r}")
        obj = getattr(obj, part)
    if not callable(obj):
        raise BadInput(f"model {path!r}: {attr!r} is a {type(obj).__name__}, not a callable that returns an nn.Module")
    return obj


def model_factory(name: str) -> Callable[..., nn.Module]:
    """The callable that builds the named model from keyword arguments (built-in ones take
    in_channels, num_classes, image_size, width positionally first). One-line BadInput for a
    name that is not one of MODEL_FORMS, or whose package or module cannot be imported."""
    name = name.strip()
    if name in MODELS:
        return MODELS[name]
    kind, sep, rest = name.partition(":")
    if not sep:
        raise BadInput(f"unknown model {name!r}; choose one of: {MODEL_FORMS}")
    if not rest:
        raise BadInput(f"model {name!r}: name the model after '{kind}:'")
    if kind == "torchvision":
        tvm = _torchvision()
        if rest not in tvm.list_models():
            raise BadInput(f"model {name!r}: torchvision has no model {rest!r} (see torchvision.models.list_models())")
        return functools.partial(tvm.get_model, rest, weights=None)
    if kind == "timm":
        timm = _timm()
        if not timm.is_model(rest):
            raise BadInput(f"model {name!r}: timm has no model {rest!r} (see timm.list_models())")
        return functools.partial(timm.create_model, rest, pretrained=False)
    return _import_callable(name)


def check_model_name(name: str) -> str:
    """The name, if `model_factory` can resolve it (imports the user's module); else BadInput."""
    model_factory(name)
    return name


def is_builtin(name: str) -> bool:
    return name in MODELS


# --------------------------------------------------------------------------- head and channels


def find_head(model: nn.Module, head: str | None = None) -> tuple[str, nn.Linear]:
    """(name, module) of the model's head: the module called `head`, else (None) the name the
    model was built with (`model.know_head`, set by build_model), else the last nn.Linear in
    `named_modules()` order. One-line BadInput when there is none or it is not an nn.Linear."""
    if head is None:
        head = getattr(model, "know_head", "") or ""
    if head:
        try:
            module = model.get_submodule(head)
        except AttributeError:
            module = None
        if module is None or module is model:
            raise BadInput(f"head {head!r}: the model has no such module; name one of its nn.Linear modules "
                           f"(e.g. {_last_linear_name(model) or 'none found'}) with --head")
        if not isinstance(module, nn.Linear):
            raise BadInput(f"head {head!r} is a {type(module).__name__}, not an nn.Linear; name the classifier's "
                           "nn.Linear with --head")
        return head, module
    name = _last_linear_name(model)
    if name is None:
        raise BadInput(f"the model ({type(model).__name__}) has no nn.Linear layer to use as its classification "
                       "head; give it one (its input is the feature vector)")
    return name, model.get_submodule(name)


def _last_linear_name(model: nn.Module) -> str | None:
    last = None
    for name, module in model.named_modules():
        if name and isinstance(module, nn.Linear):
            last = name
    return last


def set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put `module` at dotted path `name` (setattr on its parent)."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def input_channels(model: nn.Module) -> int | None:
    """The channel count of the model's first convolution (named_modules order), None without one."""
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd):
            return int(module.in_channels)
    return None


def _repeat_input_channels(channels: int, module: nn.Module, args: tuple) -> tuple | None:
    """Forward pre-hook: (N, 1, H, W) images -> (N, channels, H, W), the grey channel repeated."""
    if args and isinstance(args[0], torch.Tensor) and args[0].dim() == 4 and args[0].shape[1] == 1:
        return (args[0].repeat(1, channels, 1, 1), *args[1:])
    return None


@contextmanager
def head_inputs(model: nn.Module, head: str | None = None) -> Iterator[Callable[[], torch.Tensor]]:
    """Within the block, `grab()` returns the input the head received in the model's last
    forward pass, flattened to (N, F): the model's features, for any architecture.

        >>> m = build_model("mlp", 1, 3, 4, width=8)
        >>> with head_inputs(m) as grab:
        ...     _ = m(torch.zeros(2, 1, 4, 4))
        ...     grab().shape
        torch.Size([2, 8])
    """
    _, module = find_head(model, head)
    seen: list[torch.Tensor] = []

    def keep(_module, args):
        seen[:] = [args[0]]

    handle = module.register_forward_pre_hook(keep)

    def grab() -> torch.Tensor:
        if not seen:
            raise RuntimeError("the model's forward pass never called its head")
        return seen[0].flatten(1)

    try:
        yield grab
    finally:
        handle.remove()


# --------------------------------------------------------------------------- specs


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild a model class for a stored run (stored as a dict:
    `asdict(spec)`; records written before kwargs/head/repeat_channels load with defaults)."""

    name: str  # a built-in name (MODELS), torchvision:<name>, timm:<name> or package.module:callable
    in_channels: int  # of the data
    num_classes: int  # of the data: the head outputs this many logits
    image_size: int
    width: int | None = None  # built-in models: None = the architecture's default
    kwargs: dict[str, Any] = field(default_factory=dict)  # keyword arguments of the factory
    head: str = ""  # module the downstream protocol replaces; "" = the last nn.Linear
    repeat_channels: bool = False  # grey images repeated to the model's input channels (a pre-hook)

    def __hash__(self) -> int:  # kwargs is a dict
        return hash(json.dumps(asdict(self), sort_keys=True, default=str))

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ModelSpec":
        return cls(**d)

    def build(self, seed: int | None = None) -> nn.Module:
        """The model (seeded init when `seed` is given: see build_seeded)."""
        return build_from_spec(self) if seed is None else build_seeded(self, seed)


def _build_raw(spec: ModelSpec) -> nn.Module:
    """The factory's model, nothing adapted."""
    factory = model_factory(spec.name)
    try:
        if is_builtin(spec.name):
            model = factory(spec.in_channels, spec.num_classes, spec.image_size, spec.width, **spec.kwargs)
        else:
            model = factory(**spec.kwargs)
    except BadInput:
        raise
    except Exception as e:  # noqa: BLE001 - a factory refusing its arguments is the user's to fix
        args = f" with --model-kwargs {json.dumps(spec.kwargs)}" if spec.kwargs else ""
        raise BadInput(f"model {spec.name!r} cannot be built{args}: {type(e).__name__}: {one_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise BadInput(f"model {spec.name!r}: the factory returned a {type(model).__name__}, not an nn.Module")
    return model


def build_from_spec(spec: ModelSpec) -> nn.Module:
    """The model of a spec: the factory's model, its head replaced when it does not output
    `num_classes` logits (a fresh nn.Linear, drawn from the global RNG: build_seeded seeds it),
    the channel-repeating pre-hook when `repeat_channels`, and `model.know_head` set to the
    head's name (what replace_head and the linear probe use)."""
    model = _build_raw(spec)
    name, head = find_head(model, spec.head)
    if head.out_features != spec.num_classes:
        new = nn.Linear(head.in_features, spec.num_classes, bias=head.bias is not None)
        set_module(model, name, new.to(device=head.weight.device, dtype=head.weight.dtype))
    if spec.repeat_channels:
        channels = input_channels(model)
        if channels is None or channels <= 1:
            raise BadInput(f"model {spec.name!r}: repeat_channels is set but the model has no multi-channel "
                           "first convolution")
        model.register_forward_pre_hook(functools.partial(_repeat_input_channels, channels))
    model.know_head = name
    return model


def build_model(
    name: str, in_channels: int, num_classes: int, image_size: int, width: int | None = None,
    kwargs: dict[str, Any] | None = None, head: str = "", repeat_channels: bool = False,
) -> nn.Module:
    """Build a model by name (see model_factory); an unknown name is a one-line BadInput."""
    return build_from_spec(ModelSpec(name, in_channels, num_classes, image_size, width, dict(kwargs or {}), head,
                                     repeat_channels))


# torch's default generator is process-global: building seeded models from several threads
# at once (a thread-pool fan-out) would interleave their draws, so builds are serialised.
_INIT_LOCK = threading.Lock()


def build_seeded(spec: ModelSpec, seed: int) -> nn.Module:
    """Build a model whose initial weights depend only on `seed`, safe under threads."""
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build_from_spec(spec)


def _probe_build(spec: ModelSpec) -> nn.Module:
    """The raw model, built without touching the caller's RNG; on the meta device (no memory,
    no init cost) when the factory allows it."""
    with _INIT_LOCK, torch.random.fork_rng(devices=[]):
        try:
            with torch.device("meta"):
                return _build_raw(spec)
        except BadInput:
            raise
        except Exception:  # noqa: BLE001 - a factory that cannot build on meta: build it for real
            return _build_raw(spec)


def spec_for_data(
    name: str, in_channels: int, num_classes: int, image_size: int, width: int | None = None,
    kwargs: dict[str, Any] | None = None, head: str = "",
) -> ModelSpec:
    """The ModelSpec of model `name` on data of this shape, checked: the factory builds, the
    head exists, and the model takes the data's channels (grey images on a 3-channel model:
    `repeat_channels=True`). One-line BadInput otherwise.

        >>> spec_for_data("simple-cnn", 1, 10, 8).repeat_channels
        False
    """
    spec = ModelSpec(name, in_channels, num_classes, image_size, width, dict(kwargs or {}), head)
    model = _probe_build(spec)
    find_head(model, head)
    want = input_channels(model)
    if want is None or want == in_channels:
        return spec
    if in_channels == 1:
        return replace(spec, repeat_channels=True)
    raise BadInput(f"model {name!r} takes {want}-channel images, the data has {in_channels} channels; pick a model "
                   "(or --model-kwargs) for this data")


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
