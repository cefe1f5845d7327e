"""Prompt / completion examples from real code nobody here wrote: each documented function of a
seeded selection of the Python standard library's own sources becomes ``{"prompt": its
signature and the docstring's opening quotes, "completion": the docstring's first line}``.

    python bench/docstring_examples.py --out docstrings.jsonl [--files 100]

The file is ``softtargets distill --block-length``'s prompt / completion data (README, "Language
models"): the students learn and are measured on the docstrings only.
"""

from __future__ import annotations

import argparse
import ast
import json
from pathlib import Path

from softtargets.data.sequences import stdlib_files

#: examples longer than this many bytes (prompt or completion) are skipped, so a block holds one
LONGEST_PROMPT, LONGEST_COMPLETION = 160, 90


def examples(files: list[Path]) -> list[dict[str, str]]:
    """``{"prompt", "completion"}`` for every function with a docstring in ``files``."""
    found = []
    for path in files:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            prompt = f'def {node.name}({ast.unparse(node.args)}):\n    """'
            completion = doc.strip().splitlines()[0].strip() + '"""'
            if len(prompt) <= LONGEST_PROMPT and len(completion) <= LONGEST_COMPLETION:
                found.append({"prompt": prompt, "completion": completion})
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--files", type=int, default=100)
    args = parser.parse_args()
    rows = examples(stdlib_files(args.files, seed=0))
    args.out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    print(f"{len(rows)} examples from {args.files} files -> {args.out}")


if __name__ == "__main__":
    main()
