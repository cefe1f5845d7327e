"""The ``fit-proportions`` command: regression on class proportions from counts (``predict``, in
:mod:`softtargets.cli.serve`, serves the model). :mod:`softtargets.cli.app` registers it."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from softtargets.cli.console import console, friendly_errors
from softtargets.errors import SoftTargetsError


def _names(text: str, what: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise SoftTargetsError(f"{what}: give comma-separated column names")
    return names


@friendly_errors
def fit_proportions_command(
    file: Annotated[Path, typer.Argument(help="CSV with a header: feature and count columns.")],
    features: Annotated[str, typer.Option("--features", help="Feature columns, e.g. a,b,c.")],
    counts: Annotated[
        str, typer.Option("--counts", help="One count column per class, e.g. yes,no.")
    ],
    out: Annotated[Path, typer.Option("--out", help="Directory to save the model in.")],
    hidden: Annotated[
        list[int] | None,
        typer.Option(
            "--hidden", help="Hidden layer width (repeatable); none for logistic regression."
        ),
    ] = None,
    alpha: Annotated[float, typer.Option(help="L2 penalty (0 = none).")] = 0.0,
    standardize: Annotated[bool, typer.Option(help="Standardise the features first.")] = True,
) -> None:
    """Fit class proportions from counts (logistic regression on aggregated rows, or a network)."""
    from softtargets.run.proportions import fit_proportions

    model, result = fit_proportions(
        file, _names(features, "--features"), _names(counts, "--counts"), hidden, alpha, standardize
    )
    model.save(out)
    scaled = "; features standardised to mean 0, sd 1" if standardize else ""
    console.print(
        f"{result['rows']} rows, {result['observations']:.0f} observations{scaled}", highlight=False
    )
    if "coefficients" in result:
        for name, coefs in result["coefficients"].items():
            console.print(name, highlight=False)
            table = Table()
            table.add_column("term")
            table.add_column("coefficient", justify="right")
            for term, value in coefs.items():
                table.add_row(term, f"{value:.6f}")
            console.print(table)
    else:
        console.print(
            f"held out {result['held_out_rows']} rows: log-loss "
            f"{result['held_out_log_loss']:.4f} nats per observation, accuracy "
            f"{result['held_out_accuracy']:.2%} of observations",
            highlight=False,
        )
    console.print(f"saved the model in {out}/", highlight=False)
