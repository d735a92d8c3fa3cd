"""Reference brain models (REFERENCE.md section 2).

- :class:`DCA`: 1D convolutional autoencoder for fMRI voxel series (6,003,545 params default).
- :class:`NaiveCNN3D`: 4-block 3D CNN regressor (1,329,187 params at 64^3; 527M at full res).
- :class:`ResNet50_3D`: bottleneck 3D ResNet-50 (46,157,121 params default).
- :class:`EncodingMLP`: fc1/fc2/fc3 encoding model (22,341,152 params default).

:data:`MODELS` maps the names used in configs (``[model] name = "dca"``) to the classes;
:func:`build_model` constructs one from a name and keyword arguments.
"""

from __future__ import annotations

import inspect

from torch import nn

from .cnn3d import NaiveCNN3D, naive_cnn3d_parameter_count
from .dca import DCA, dca_loss, dca_parameter_count
from .encoding import EncodingMLP, encoding_mlp_parameter_count
from .resnet3d import ResNet50_3D, resnet50_3d_parameter_count

__all__ = ["DCA", "NaiveCNN3D", "ResNet50_3D", "EncodingMLP", "MODELS", "build_model",
           "model_arguments", "parameter_count", "dca_loss", "dca_parameter_count",
           "naive_cnn3d_parameter_count", "resnet50_3d_parameter_count",
           "encoding_mlp_parameter_count"]

MODELS: dict[str, type[nn.Module]] = {
    "dca": DCA,
    "naive_cnn3d": NaiveCNN3D,
    "resnet50_3d": ResNet50_3D,
    "encoding_mlp": EncodingMLP,
}


def model_arguments(name: str) -> dict[str, object]:
    """Keyword arguments model ``name`` accepts, mapped to their defaults."""
    if name not in MODELS:
        raise KeyError(f"unknown model {name!r}; choose one of {sorted(MODELS)}")
    params = inspect.signature(MODELS[name].__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self"}


def build_model(name: str, **kwargs) -> nn.Module:
    """Construct the model registered as ``name`` with ``kwargs``.

    Unknown keyword arguments raise ``TypeError`` naming the argument and listing the valid ones.
    """
    allowed = model_arguments(name)
    for key in kwargs:
        if key not in allowed:
            raise TypeError(f"model {name!r} has no argument {key!r}; "
                            f"valid arguments: {', '.join(allowed)}")
    return MODELS[name](**kwargs)


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
