"""The ``methods`` and ``models`` commands: what ``--method`` and ``--teacher``/``--student``
accept, read from the method registry and the model builders. :mod:`softtargets.cli.app`
registers them."""

from __future__ import annotations

from rich.table import Table

from softtargets.cli.console import console
from softtargets.losses.methods import METHODS


def methods() -> None:
    """The distillation methods (the registry --method reads): loss per row, paper, options."""
    table = Table(title="methods (every one also takes warmup=N epochs)", title_justify="left")
    for column in ("method", "per row", "paper", "options"):
        table.add_column(column)
    for name, method in METHODS.items():
        table.add_row(name, method.per_row, method.paper, ", ".join(method.options) or "-")
    console.print(table)


MODEL_FORM_TABLE = (
    ("mlp, cnn1d, cnn2d", "a built-in builder (its options below)"),
    (
        "package.module:callable",
        "your builder or class, imported as Python imports it (that runs its code)",
    ),
    ("path/to/file.py:callable", "the same, from a file (its code runs when it is loaded)"),
    ("hf:PATH", "a Hugging Face classifier saved in a local folder (the hf extra)"),
    ("hf-config:PATH", "that family with random weights from its config.json; options override it"),
)


def models() -> None:
    """The model forms and the built-in builders' options (for --teacher-option/--student-option)."""
    import inspect

    from softtargets.training.models import MODELS

    forms = Table(title="model forms (--teacher, --student, YAML name:)", title_justify="left")
    forms.add_column("form")
    forms.add_column("what")
    for form, what in MODEL_FORM_TABLE:
        forms.add_row(form, what)
    console.print(forms)
    console.print(
        "An import path's callable gets the options as keyword arguments, and in_shape, "
        "in_features and num_classes when its signature names them; it returns a "
        "torch.nn.Module giving (rows, classes) logits. Every model is run on two rows before "
        "anything trains. --teacher-weights FILE loads pretrained weights (.safetensors, or "
        ".pt/.pth with weights_only=True).\n",
        highlight=False,
    )
    skip = ("in_features", "in_shape", "out_features", "num_classes", "vocab_size")
    table = Table(
        title="built-in models (any torch.nn.Module also works from Python)", title_justify="left"
    )
    for column in ("model", "option", "default", "what"):
        table.add_column(column)
    for name, (_, documented) in MODELS.items():
        paragraph = (inspect.getdoc(documented) or "").split("\n\n")[0]
        summary = paragraph.replace("\n", " ").replace("``", "")
        options = [
            p for p in inspect.signature(documented).parameters.values() if p.name not in skip
        ]
        for i, p in enumerate(options):
            default = p.default
            if isinstance(default, tuple):
                default = list(default)
            table.add_row(name if i == 0 else "", p.name, str(default), summary if i == 0 else "")
    console.print(table)
