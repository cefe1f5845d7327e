"""The README's two commands are the ones CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_opens_with_the_demo_and_test_commands() -> None:
    blocks = re.findall(r"```bash\n(.*?)\n```", (ROOT / "README.md").read_text(), re.S)
    demo, tests = blocks[0].strip(), blocks[1].strip()
    assert demo.endswith("softtargets demo") and "torch==2.13.0" in demo
    test_command = tests.split("&&")[-1].strip()
    assert test_command.startswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert test_command in [line.strip() for line in ci]


def test_the_readme_methods_table_lists_the_registrys_methods() -> None:
    """The methods table is written by hand (it carries measured results); its rows are the
    registry's methods, no more and no fewer."""
    from softtargets.losses.methods import METHODS

    text = (ROOT / "README.md").read_text()
    table = text[text.index("| method | per row") :].split("\n\n")[0]
    rows = re.findall(r"^\| `([a-z]+)` \|", table, re.M)
    assert rows == list(METHODS)


def test_help_and_configs_read_the_method_names_from_the_registry() -> None:
    from typer.testing import CliRunner

    from softtargets.cli.app import app
    from softtargets.config import DistillConfig
    from softtargets.errors import SoftTargetsError
    from softtargets.losses.methods import METHODS, check_run_methods

    shown = CliRunner().invoke(app, ["distill", "--help"], env={"COLUMNS": "400"}).output
    assert ", ".join(METHODS) in " ".join(shown.split())
    listed = CliRunner().invoke(app, ["methods"], env={"COLUMNS": "400"}).output
    assert all(name in listed for name in METHODS)
    config = DistillConfig(methods=["kd", "nope"])  # names are checked when a run starts
    try:
        check_run_methods(config.methods, config.method_options)
    except SoftTargetsError as err:
        assert f"use one of {', '.join(METHODS)}" in str(err)
    else:
        raise AssertionError("an unknown method was accepted")


def test_the_readmes_python_imports_resolve() -> None:
    text = (ROOT / "README.md").read_text()
    imports = [
        statement
        for block in re.findall(r"```python\n(.*?)```", text, re.S)
        for statement in re.findall(r"^from softtargets[^(\n]*(?:\([^)]*\))?", block, re.M)
    ]
    assert len(imports) >= 5
    for statement in imports:
        exec(statement, {})  # an ImportError names the stale path
