"""Models named by import path: ``package.module:callable`` or ``path/to/file.py:callable``.

An engineer's own architecture (a ResNet of their own, a student they designed) enters the main
job through the same ``--teacher``/``--student`` a built-in name does. Naming an import path runs
that code, exactly as ``import`` would: that is the point, and the README says so.

The callable gets the model's options as keyword arguments, plus ``in_shape`` (the feature shape
of one row), ``in_features`` (its product) and ``num_classes`` when its signature names them. It
must return a ``torch.nn.Module`` mapping ``(N, *in_shape)`` to ``(N, num_classes)`` logits.
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import inspect
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from softtargets.errors import SoftTargetsError, first_line

#: what the data offers a builder, by parameter name, when its signature asks for it
DATA_PARAMETERS = ("in_shape", "in_features", "num_classes")


def is_import_path(name: str) -> bool:
    """Whether ``name`` is ``module:callable`` or ``file.py:callable`` (not ``hf:``/``hf-config:``)."""
    head, colon, tail = name.rpartition(":")
    return bool(colon and head and tail) and not name.startswith(("hf:", "hf-config:"))


def portable(name: str) -> str:
    """``name`` with a file's path made absolute, so a saved model is rebuilt from anywhere."""
    if not is_import_path(name):
        return name
    where, _, attribute = name.rpartition(":")
    if not where.endswith(".py"):
        return name
    return f"{Path(where).expanduser().resolve()}:{attribute}"


def find_callable(name: str) -> Callable[..., Any]:
    """The callable an import path names, its module imported (or its file run) first.

    Every way this fails is one line: no such module or file, the module raised while it was
    imported, no such attribute, or an attribute that cannot be called.
    """
    where, _, attribute = name.rpartition(":")
    module = _import_file(where) if where.endswith(".py") else _import_module(where)
    found: Any = module
    for part in attribute.split("."):
        if not hasattr(found, part):
            raise SoftTargetsError(
                f"model {name!r}: {where} has no attribute {attribute!r}; check the name after ':'"
            )
        found = getattr(found, part)
    if not callable(found):
        raise SoftTargetsError(f"model {name!r}: {attribute} is not a function or class")
    return found


def _import_module(where: str) -> Any:
    try:
        return importlib.import_module(where)
    except ModuleNotFoundError as err:
        raise SoftTargetsError(
            f"model {where!r}: no module named {err.name!r}; is it installed, or on PYTHONPATH? "
            "(a file is named path/to/file.py:callable)"
        ) from None
    except Exception as err:  # the user's module raised while it was imported
        raise SoftTargetsError(f"importing {where} raised {first_line(err)}") from None


def _import_file(where: str) -> Any:
    path = Path(where).expanduser()
    if not path.is_file():
        raise SoftTargetsError(f"model file {where} does not exist or is not a file")
    resolved = path.resolve()
    # One module per file content: the same file imported twice is the same module, and an
    # edited file is imported afresh.
    digest = hashlib.sha256(resolved.read_bytes()).hexdigest()[:12]
    module_name = f"softtargets_model_{resolved.stem}_{digest}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, resolved)
    if spec is None or spec.loader is None:
        raise SoftTargetsError(f"model file {where} cannot be imported as Python")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module  # dataclasses and pickling look the module up by name
    try:
        spec.loader.exec_module(module)
    except Exception as err:
        del sys.modules[module_name]
        raise SoftTargetsError(f"running {where} raised {first_line(err)}") from None
    return module


def build_imported(
    name: str, in_shape: Sequence[int], num_classes: int, options: dict[str, Any]
) -> nn.Module:
    """Call the builder ``name`` names with ``options`` and what the data offers; see the module."""
    builder = find_callable(name)
    offered = {
        "in_shape": tuple(in_shape),
        "in_features": math.prod(in_shape),
        "num_classes": num_classes,
    }
    try:
        parameters = inspect.signature(builder).parameters
    except (TypeError, ValueError):  # a builtin without a signature: options only
        parameters = {}
    clash = sorted(set(options) & set(offered))
    if clash:
        raise SoftTargetsError(
            f"option {clash[0]!r} for model {name!r} comes from the data; leave it out"
        )
    takes_any = any(p.kind is p.VAR_KEYWORD for p in parameters.values())
    if parameters and not takes_any:
        unknown = sorted(set(options) - set(parameters))
        if unknown:
            valid = [p for p in parameters if p not in DATA_PARAMETERS]
            raise SoftTargetsError(
                f"unknown option {unknown[0]!r} for model {name!r}; it takes: "
                f"{', '.join(valid) or 'no options'}"
            )
    given = {k: v for k, v in offered.items() if k in parameters}
    try:
        model = builder(**given, **options)
    except Exception as err:
        raise SoftTargetsError(f"model {name!r} raised {first_line(err)}") from None
    if not isinstance(model, nn.Module):
        raise SoftTargetsError(
            f"model {name!r} returned a {type(model).__name__}, not a torch.nn.Module"
        )
    return model
