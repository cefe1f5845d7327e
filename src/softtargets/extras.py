"""The optional extras, imported when a feature needs one: a missing extra is one line naming the
command that installs it, never an ``ImportError`` from deep inside a run.

| extra | packages | for |
| --- | --- | --- |
| ``hf`` | ``transformers``, ``tokenizers`` | ``hf:PATH`` / ``hf-config:PATH`` models, text data |
| ``onnx`` | ``onnx``, ``onnxscript``, ``onnxruntime`` | ``softtargets export --format onnx`` |
"""

from __future__ import annotations

import importlib
from types import ModuleType

from softtargets.errors import SoftTargetsError

#: extra -> (what needs it, the command that installs it)
EXTRAS = {
    "hf": ("Hugging Face models and text data", 'pip install -e ".[hf]"'),
    "onnx": ("--format onnx", 'pip install -e ".[onnx]"'),
}


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` of optional ``extra``, or say in one line how to install it."""
    try:
        imported = importlib.import_module(module)
    except ImportError:
        what, command = EXTRAS[extra]
        raise SoftTargetsError(
            f"{what} need the optional {extra!r} extra ({module} is not installed); install it "
            f"with {command}"
        ) from None
    if module == "transformers":
        imported.logging.set_verbosity_error()  # its notes on unused weights are not the user's
    return imported
