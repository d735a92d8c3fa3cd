"""Reference brain models (docs/background.md section 2), and your own.

- :class:`DCA`: 1D convolutional autoencoder for fMRI voxel series (6,003,545 params default).
- :class:`NaiveCNN3D`: 4-block 3D CNN regressor (1,329,187 params at 64^3; 527M at full res).
- :class:`ResNet50_3D`: bottleneck 3D ResNet-50 (46,157,121 params default).
- :class:`EncodingMLP`: fc1/fc2/fc3 encoding model (22,341,152 params default).
- :class:`UNet3D`: 3D U-Net for voxel segmentation (339,906 params default).

:data:`MODELS` maps the names used in configs (``[model] name = "dca"``) to the classes;
:func:`build_model` constructs one from a name and keyword arguments.

**Your own model**: ``[model] name = "package.module:Class"`` (importable: installed, or on
``PYTHONPATH``) or ``"path/to/models.py:Class"`` (a file, relative to the current directory),
with its keyword arguments in ``[model]`` like a built-in's. :func:`resolve_model` finds the
class; its constructor's signature is checked against the config like a built-in's.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import sys

from torch import nn

from .cnn3d import NaiveCNN3D, naive_cnn3d_layers, naive_cnn3d_parameter_count
from .dca import DCA, dca_loss, dca_parameter_count
from .encoding import EncodingMLP, encoding_mlp_parameter_count
from .resnet3d import ResNet50_3D, resnet50_3d_parameter_count
from .unet3d import UNet3D, unet3d_parameter_count

__all__ = ["DCA", "NaiveCNN3D", "ResNet50_3D", "EncodingMLP", "UNet3D", "MODELS", "build_model",
           "model_arguments", "resolve_model", "is_model_spec", "ModelNotFound", "parameter_count",
           "dca_loss", "dca_parameter_count", "naive_cnn3d_parameter_count", "naive_cnn3d_layers",
           "resnet50_3d_parameter_count", "encoding_mlp_parameter_count", "unet3d_parameter_count"]

MODELS: dict[str, type[nn.Module]] = {
    "dca": DCA,
    "naive_cnn3d": NaiveCNN3D,
    "resnet50_3d": ResNet50_3D,
    "encoding_mlp": EncodingMLP,
    "unet3d": UNet3D,
}


class ModelNotFound(LookupError):
    """A ``[model] name`` that is neither registered nor an importable ``module:Class``."""


def is_model_spec(name: str) -> bool:
    """True for ``"package.module:Class"`` / ``"file.py:Class"`` (an own model), False for a
    registered name."""
    return ":" in name


def _load_file(path: str, name: str):
    full = os.path.abspath(os.path.expanduser(path))
    if not os.path.isfile(full):
        raise ModelNotFound(f"[model] name = \"{name}\": the file {full} does not exist (a "
                            "relative path is relative to the current directory)")
    module_name = "pbm_user_model_" + os.path.splitext(os.path.basename(full))[0]
    spec = importlib.util.spec_from_file_location(module_name, full)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # pickling/dataclasses look the module up by name
    spec.loader.exec_module(module)
    return module


def resolve_model(name: str) -> type[nn.Module]:
    """The class a ``[model] name`` names: a registered model, ``package.module:Class`` or
    ``file.py:Class``. Raises :class:`ModelNotFound` saying what was looked for and where."""
    if not is_model_spec(name):
        if name not in MODELS:
            raise ModelNotFound(f"unknown model {name!r}; choose one of {sorted(MODELS)} or name "
                                "your own as \"package.module:Class\" or \"file.py:Class\"")
        return MODELS[name]
    where, _, attribute = name.rpartition(":")
    if not where or not attribute:
        raise ModelNotFound(f"[model] name = \"{name}\": expected \"package.module:Class\" or "
                            "\"file.py:Class\"")
    try:
        module = _load_file(where, name) if where.endswith(".py") or os.sep in where \
            else importlib.import_module(where)
    except ModelNotFound:
        raise
    except ImportError as exc:
        raise ModelNotFound(f"[model] name = \"{name}\": cannot import {where} ({exc}); install "
                            "the package, put it on PYTHONPATH, or give a file path "
                            "\"models.py:Class\"") from None
    except Exception as exc:  # noqa: BLE001 - the user's module failed while importing
        raise ModelNotFound(f"[model] name = \"{name}\": importing {where} failed: "
                            f"{type(exc).__name__}: {exc}") from None
    cls = getattr(module, attribute, None)
    if cls is None:
        found = [n for n, v in vars(module).items()
                 if isinstance(v, type) and issubclass(v, nn.Module) and v.__module__ == module.__name__]
        raise ModelNotFound(f"[model] name = \"{name}\": {where} has no {attribute!r}; its "
                            f"torch modules: {', '.join(found) or 'none'}")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise ModelNotFound(f"[model] name = \"{name}\": {attribute} is not a torch.nn.Module "
                            "subclass")
    return cls


def model_arguments(name: str) -> dict[str, object]:
    """Keyword arguments model ``name`` accepts, mapped to their defaults
    (``inspect.Parameter.empty`` where there is none). A constructor taking ``**kwargs``
    accepts anything: its entry ``"**"`` says so."""
    try:
        cls = resolve_model(name)
    except ModelNotFound as exc:
        raise KeyError(str(exc)) from None
    params = inspect.signature(cls.__init__).parameters
    out = {k: p.default for k, p in params.items()
           if k != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    if any(p.kind == p.VAR_KEYWORD for p in params.values()):
        out["**"] = inspect.Parameter.empty
    return out


def build_model(name: str, **kwargs) -> nn.Module:
    """Construct the model ``name`` (registered, or ``module:Class`` / ``file.py:Class``) with
    ``kwargs``.

    Unknown keyword arguments raise ``TypeError`` naming the argument and listing the valid ones.
    """
    allowed = model_arguments(name)
    for key in kwargs:
        if key not in allowed and "**" not in allowed:
            raise TypeError(f"model {name!r} has no argument {key!r}; "
                            f"valid arguments: {', '.join(k for k in allowed if k != '**')}")
    return resolve_model(name)(**kwargs)


def parameter_count(model: nn.Module) -> int:
    """Number of trainable parameters of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
