"""Token-level distillation on real text nobody here wrote: the Python standard library's own
source files, byte-level, split by file.

    python bench/lm_demo.py [--files 40] [--seeds 3] [--on-policy 0.5]

A 4-layer teacher is trained on next tokens; then 1-layer students over seeds, each from the same
initial weights per seed: next-token cross-entropy only, KD from the teacher's full logits (run
online), and KD from top-32 and top-8 stores (their rest's mass kept at T), the top-32 one also
with 16-bit codes (nearly unquantised) to show what the 7-bit packing costs, and on-policy KD
(GKD: on that fraction of steps the student writes the second half of each block and learns the
online teacher's distribution over its own tokens). Prints test bits per byte, mean and 95%
interval over seeds, each arm minus cross-entropy (paired by seed), on-policy minus off-policy
KD from the same online teacher, the stores' bytes per token and the wall time. The command line
runs the same job (``softtargets distill --block-length``); this is the Python path, with every
arm side by side.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from softtargets.data.sequences import (
    Blocks,
    ByteTokenizer,
    pack_blocks,
    read_corpus,
    split_by_file,
    stdlib_files,
)
from softtargets.run.stats import mean_ci, paired_difference
from softtargets.store.tokens import label_tokens
from softtargets.training.gpt import gpt
from softtargets.training.lm import fit_lm, next_token_loss
from softtargets.training.weights import load_into

BLOCK, T, ALPHA = 128, 2.0, 0.5


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--on-policy", type=float, default=0.5, help="0 leaves the arm out")
    parser.add_argument("--teacher-weights", help="a trained teacher of this recipe's shape")
    parser.add_argument("--student-share", type=float, default=1.0,
                        help="the students train on about this share of the teacher's training "
                        "files (whole files, seeded): Hinton's less-data question")  # fmt: skip
    args = parser.parse_args()
    started = time.perf_counter()
    torch.manual_seed(0)
    tokenizer = ByteTokenizer()
    blocks = pack_blocks(read_corpus(stdlib_files(args.files)), BLOCK, tokenizer.vocab_size)
    train, val, test = split_by_file(blocks, 0.1, 0.2, seed=0)
    students_train = share_of_files(train, args.student_share)
    print(f"{len(train)} / {len(val)} / {len(test)} blocks of {BLOCK} bytes (train/val/test)")
    teacher = gpt(tokenizer.vocab_size, layers=4, heads=4, width=128, context=BLOCK)
    if args.teacher_weights:  # e.g. the teacher of `softtargets distill --data stdlib ...`
        load_into(teacher, args.teacher_weights, "teacher")
    else:
        fit_lm(teacher, train, val, None, epochs=args.teacher_epochs, lr=3e-3, batch_blocks=16)
    teacher.eval()
    bits = math.log(2)
    print(f"teacher: test {next_token_loss(teacher, test) / bits:.3f} bits per byte "
          f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
    stores = {k: label_tokens(teacher, train, top=k, temperatures=(T,)) for k in (32, 8)}
    # the same top-32 logits nearly unquantised (16-bit codes): what the 7-bit packing costs
    fine = label_tokens(teacher, train, top=32, temperatures=(T,), code_bits=16)
    arms = {"next-token CE": None, "KD, full logits": teacher,
            "KD, top-32 store": stores[32], "KD, top-32, 16-bit": fine,
            "KD, top-8 store": stores[8]}  # fmt: skip
    on_policy = f"KD, on-policy {args.on_policy:g}"
    if args.on_policy:
        arms[on_policy] = teacher
    results: dict[str, list[float]] = {name: [] for name in arms}
    for seed in range(args.seeds):
        for name, source in arms.items():
            torch.manual_seed(seed)
            student = gpt(tokenizer.vocab_size, layers=1, heads=4, width=128, context=BLOCK)
            fit_lm(student, students_train, val, source, temperature=T, alpha=ALPHA,
                   epochs=args.epochs,
                   lr=3e-3, batch_blocks=16, seed=seed,
                   on_policy=args.on_policy if name == on_policy else 0.0)  # fmt: skip
            results[name].append(next_token_loss(student, test) / bits)
    print(f"students (1 layer, {len(students_train)} of the {len(train)} training blocks), test "
          f"bits per byte over {args.seeds} seeds, T = {T:g}, alpha = {ALPHA:g}:")  # fmt: skip
    for name, values in results.items():
        line = f"  {name:<18} {mean_ci(values).format(1, 3)}"
        if name != "next-token CE":
            line += f"   minus CE: {paired_difference(values, results['next-token CE']).describe(1, '', 3)}"
        print(line)
    for k, store in stores.items():
        print(f"top-{k} store: {store.bytes_per_token:.1f} bytes per token")
    print(f"top-32 store, 16-bit codes: {fine.bytes_per_token:.1f} bytes per token")
    print("packed (7-bit) minus 16-bit codes, top-32: "
          f"{paired_difference(results['KD, top-32 store'], results['KD, top-32, 16-bit']).describe(1, '', 3)}")  # fmt: skip
    if args.on_policy:
        print(f"on-policy minus off-policy KD (both from the online teacher): "
              f"{paired_difference(results[on_policy], results['KD, full logits']).describe(1, '', 3)}")  # fmt: skip
    print(f"wall time {time.perf_counter() - started:.0f} s")


def share_of_files(train: Blocks, share: float) -> Blocks:
    """The blocks of a seeded choice of ``train``'s files holding about ``share`` of its blocks
    (all of them for a share of 1)."""
    if share >= 1:
        return train
    files = torch.unique(train.file_index)
    files = files[torch.randperm(len(files), generator=torch.Generator().manual_seed(1))]
    chosen, count = [], 0
    for file in files.tolist():
        if count >= share * len(train):
            break
        chosen.append(file)
        count += int((train.file_index == file).sum())
    rows = torch.isin(train.file_index, torch.tensor(chosen)).nonzero().squeeze(1)
    return train.take(rows)


if __name__ == "__main__":
    main()
