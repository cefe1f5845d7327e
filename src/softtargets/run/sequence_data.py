"""The corpus of a language-model run: its text files, its tokenizer, its blocks and splits.

``--data`` is ``stdlib`` (a seeded selection of the Python standard library's own source files),
a text file, a JSON Lines file of prompt / completion examples (:mod:`softtargets.data.examples`:
only the completions are learnt and measured), or a folder of them; the tokenizer is
``--tokenizer FOLDER``, an ``hf:`` model's folder, or the built-in byte-level one. Files (or
examples) are split whole into train, validation and test.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from softtargets import distributed
from softtargets.config import (
    SEQUENCE_STUDENT,
    SEQUENCE_TEACHER,
    STDLIB_FILES,
    DistillConfig,
    ModelConfig,
    check_budget,
    memory_budget,
    sequence_training,
)
from softtargets.data.examples import EXAMPLES_SUFFIX, example_pieces, is_examples_file
from softtargets.data.sequences import (
    Blocks,
    ByteTokenizer,
    Piece,
    blocks_in_memory,
    blocks_to_file,
    map_token_file,
    split_by_file,
    stdlib_files,
    text_pieces,
)
from softtargets.data.text import load_tokenizer
from softtargets.errors import SoftTargetsError, first_line
from softtargets.files import parse_json, read_small_text
from softtargets.run.data import tokenizer_folder
from softtargets.training.hf import is_hf_name

#: the built-in corpus: a seeded selection of the Python standard library's own source files
STDLIB = "stdlib"

#: the suffixes read from a folder of text files (and of prompt / completion examples)
TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py", EXAMPLES_SUFFIX)

BITS = math.log(2)

#: the run folder's token file (``--stream``): the packed corpus, mapped as batches need it
TOKEN_FILE = "tokens.bin"


@dataclass
class SequenceSplits:
    """The corpus packed into blocks and split by file (never a file in two parts), or by
    example for prompt / completion examples."""

    train: Blocks
    val: Blocks
    test: Blocks
    #: how many files (or examples) the split dealt out
    files: int
    #: what a token is: "byte" (the built-in tokenizer: bits per token are bits per byte) or
    #: "token" (a saved subword tokenizer)
    unit: str = "byte"

    @property
    def split_unit(self) -> str:
        """What the split deals out whole: "example" (prompt / completion data) or "file"."""
        return "example" if self.train.spans is not None else "file"


def is_sequence_job(config: DistillConfig) -> bool:
    return config.data.block_length is not None


def with_sequence_models(config: DistillConfig) -> DistillConfig:
    """``config`` with the language-model defaults (models and trainings) in place of the
    classifier defaults; a model or training the user changed is kept."""
    defaults = DistillConfig()
    update: dict[str, Any] = {}
    for role, (name, options) in (("teacher", SEQUENCE_TEACHER), ("student", SEQUENCE_STUDENT)):
        if getattr(config, role) == getattr(defaults, role):
            update[role] = ModelConfig(name=name, options=dict(options))
        training = f"{role}_training"
        if getattr(config, training) == getattr(defaults, training):
            update[training] = sequence_training(role)
    return config.model_copy(update=update)


def corpus_files(config: DistillConfig) -> list[Path]:
    """The text files of ``config.data``: ``stdlib`` (option ``files``, default
    :data:`~softtargets.config.STDLIB_FILES`), or :func:`text_files` of a file or folder."""
    name, options = config.data.name, config.data.options
    if name == STDLIB:
        count = int(options.get("files", STDLIB_FILES))
        return stdlib_files(count, seed=int(options.get("seed", 0)))
    return text_files(Path(name))


def text_files(path: Path) -> list[Path]:
    """``[path]`` for a file, or a folder's regular files ending in :data:`TEXT_SUFFIXES`
    (sorted; no links, nothing hidden); a folder without any is one line."""
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*")
            if p.suffix in TEXT_SUFFIXES and p.is_file() and not p.is_symlink()
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )  # fmt: skip
        if not files:
            raise SoftTargetsError(
                f"{path} holds no text files ({', '.join(TEXT_SUFFIXES)}); give a folder of them"
            )
        return files
    raise SoftTargetsError(
        f"{path}: no such file or folder; language models read '{STDLIB}', a text file, a "
        f"{EXAMPLES_SUFFIX} file of prompt / completion examples, or a folder of them"
    )


class SavedTokenizer:
    """A tokenizer saved in a local folder (Hugging Face's), as :func:`read_corpus` reads text:
    ``encode`` without special tokens, an end-of-document id, and the vocabulary the models'
    logits span (the folder's ``config.json`` ``vocab_size`` when it has one: models often pad
    their embeddings beyond the tokenizer's size)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder
        self.tokenizer = load_tokenizer(folder)
        self.eos_id = self.tokenizer.eos_token_id
        if self.eos_id is None:
            raise SoftTargetsError(
                f"the tokenizer in {folder} has no end-of-text token; set one "
                "(tokenizer.eos_token = ...) and save it again"
            )
        self.vocab_size = len(self.tokenizer)
        config = Path(folder) / "config.json"
        if config.is_file():
            given = parse_json(read_small_text(config, "config.json"), str(config))
            if isinstance(given, dict) and isinstance(given.get("vocab_size"), int):
                self.vocab_size = max(self.vocab_size, given["vocab_size"])

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def chat(self, messages: list[dict[str, str]]) -> tuple[str, str]:
        """A conversation as ``(prompt, completion)`` text by the tokenizer's chat template: every
        message but the last with the assistant's turn opened, then what the whole conversation
        adds to it (the last message and the template's end of its turn)."""
        if not getattr(self.tokenizer, "chat_template", None):
            raise SoftTargetsError(
                f"the tokenizer in {self.folder} has no chat template; give prompt / completion "
                "examples, or a tokenizer folder whose tokenizer_config.json has one"
            )
        try:
            prompt = self.tokenizer.apply_chat_template(
                messages[:-1], tokenize=False, add_generation_prompt=True
            )
            whole = self.tokenizer.apply_chat_template(messages, tokenize=False)
        except Exception as err:  # the template's own checks (jinja raise_exception)
            raise SoftTargetsError(
                f"the chat template of {self.folder} fails on it ({first_line(err, typed=False)})"
            ) from None
        if not whole.startswith(prompt):
            raise SoftTargetsError(
                f"the chat template of {self.folder} does not write the conversation as its "
                "prompt followed by the last message; give prompt / completion examples"
            )
        return prompt, whole[len(prompt) :]


def text_tokenizer(config: DistillConfig) -> ByteTokenizer | SavedTokenizer:
    """The tokenizer of a language-model run: ``--tokenizer FOLDER``, else an ``hf:`` teacher's or
    student's folder, else the built-in byte-level one (nothing to install)."""
    uses_hf = any(is_hf_name(m.name) for m in (config.teacher, config.student))
    if config.data.tokenizer is None and not uses_hf:
        return ByteTokenizer()
    return SavedTokenizer(tokenizer_folder(config))


def load_sequence_splits(
    config: DistillConfig, token_file: Path | None = None, tokenizer: Any = None
) -> SequenceSplits:
    """Read, tokenise (:func:`text_tokenizer`, or ``tokenizer`` when the caller has loaded it),
    pack and split the corpus; one-line errors for what cannot be (not UTF-8, shorter than a
    block, too few files to split).

    In memory, unless ``token_file`` is given (``--stream``, corpora larger than memory): then the
    files are tokenised one at a time into that file (by rank 0 under torchrun) and mapped back.
    """
    data = config.data
    if data.test is not None:
        raise SoftTargetsError(
            "language modelling holds out whole files of the corpus as its test set; leave out "
            "--test-data"
        )
    tokenizer = tokenizer or text_tokenizer(config)
    assert data.block_length is not None
    files = corpus_files(config)
    pieces = corpus_pieces(files, tokenizer, data.block_length)
    if token_file is not None:
        blocks = _packed_to_file(pieces, tokenizer.vocab_size, data.block_length, token_file)
    else:
        check_budget(
            memory_bytes(files, data.block_length), f"the corpus ({len(files)} files) in memory",
            "pass --stream (a token file in the run folder, read as batches need it)",
        )  # fmt: skip
        blocks = blocks_in_memory(pieces, data.block_length, tokenizer.vocab_size)
    train, val, test = split_by_file(blocks, data.val_fraction, data.test_fraction, data.split_seed)
    unit = "byte" if isinstance(tokenizer, ByteTokenizer) else "token"
    return SequenceSplits(train, val, test, len(blocks.files), unit)


def memory_bytes(files: list[Path], block_length: int) -> int:
    """What a corpus takes in memory at most: 8 bytes a token as int64 blocks; a token is at most
    a byte of text, and an example (a line of a ``.jsonl`` file) at most a padded block."""
    return 8 * sum(
        _lines(f) * (block_length + 1) if is_examples_file(f) else f.stat().st_size for f in files
    )


def _lines(path: Path) -> int:
    """Newlines in a file, counted a megabyte at a time (one for a last line without one)."""
    count, last = 0, b"\n"
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 20):
            count, last = count + chunk.count(b"\n"), chunk[-1:]
    return count + (last != b"\n")


def reads_from_token_file(config: DistillConfig) -> bool:
    """Whether a run reads its corpus from a token file: ``--stream``, or a corpus that would
    not fit the memory budget in memory (then without being asked)."""
    assert config.data.block_length is not None
    needed = memory_bytes(corpus_files(config), config.data.block_length)
    return config.data.stream or needed > memory_budget()


def corpus_pieces(files: list[Path], tokenizer: Any, block_length: int) -> Iterator[Piece]:
    """Each file's blocks as they are read: a text file's windows, or one piece per example of a
    JSON Lines file (a corpus mixing the two is refused as it is packed)."""
    for file in files:
        if is_examples_file(file):
            yield from example_pieces(file, tokenizer, block_length)
        else:
            yield from text_pieces([file], tokenizer, block_length)


def _packed_to_file(
    pieces: Iterator[Piece], vocab_size: int, block_length: int, path: Path
) -> Blocks:
    """:func:`blocks_to_file` on rank 0; the other processes map the file it wrote (or stop with
    its one-line error: a file of examples is read by rank 0 alone)."""
    blocks = distributed.on_main(lambda: blocks_to_file(pieces, block_length, vocab_size, path))
    owners, files, spans = distributed.share_from_main(
        (blocks.file_index, blocks.files, blocks.spans) if blocks is not None else None
    )
    if blocks is None:
        blocks = map_token_file(path, block_length, owners, files, vocab_size, spans)
    return blocks
