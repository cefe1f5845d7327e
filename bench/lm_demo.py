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
from safetensors.torch import save_file

from softtargets.data.sequences import (
    Blocks,
    ByteTokenizer,
    pack_blocks,
    read_corpus,
    split_by_file,
    stdlib_files,
)
from softtargets.run.stats import mean_ci, paired_difference
from softtargets.store.tokens import CODE_BITS, TokenStore, label_tokens
from softtargets.training.gpt import gpt
from softtargets.training.lm import fit_lm, next_token_loss
from softtargets.training.weights import cpu_state, load_into

BLOCK = 128


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=40)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--teacher-epochs", type=int, default=6)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--on-policy", type=float, default=0.5, help="0 leaves the arm out")
    parser.add_argument(
        "--arms",
        help="comma-separated: ce, full, top32, top32-16bit, "
        "top32-7bit, top8, on-policy [default: all but top32-7bit; on-policy "
        "unless --on-policy 0]",
    )
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument("--alpha", type=float, default=0.5, help="the method's weight")
    parser.add_argument("--teacher-share", type=float, default=1.0,
                        help="the teacher trains on this share of the training blocks and the "
                        "students on the others (a transfer set)")  # fmt: skip
    parser.add_argument("--save-teacher", help="save the trained teacher here (safetensors)")
    parser.add_argument("--teacher-weights", help="a trained teacher of this recipe's shape")
    parser.add_argument("--student-share", type=float, default=1.0,
                        help="the students train on this share of the teacher's training blocks "
                        "(seeded): Hinton's less-data question")  # fmt: skip
    args = parser.parse_args()
    T, ALPHA = args.temperature, args.alpha  # noqa: N806 (the paper's symbols)
    started = time.perf_counter()
    torch.manual_seed(0)
    tokenizer = ByteTokenizer()
    blocks = pack_blocks(read_corpus(stdlib_files(args.files)), BLOCK, tokenizer.vocab_size)
    train, val, test = split_by_file(blocks, 0.1, 0.2, seed=0)
    students_train = share_of_blocks(train, args.student_share)
    teacher_train = train
    if (
        args.teacher_share < 1
    ):  # Hinton's transfer set: students learn on text the teacher never saw
        teacher_train = share_of_blocks(train, args.teacher_share)
        seen = set(teacher_train.block_ids.tolist())
        rest = [i for i, b in enumerate(train.block_ids.tolist()) if b not in seen]
        students_train = train.take(torch.tensor(rest))
    print(f"{len(train)} / {len(val)} / {len(test)} blocks of {BLOCK} bytes (train/val/test)")
    teacher = gpt(tokenizer.vocab_size, layers=4, heads=4, width=128, context=BLOCK)
    if args.teacher_weights:  # e.g. the teacher of `softtargets distill --data stdlib ...`
        load_into(teacher, args.teacher_weights, "teacher")
    else:
        fit_lm(teacher, teacher_train, val, None, epochs=args.teacher_epochs, lr=3e-3,
               batch_blocks=16)  # fmt: skip
        if args.save_teacher:
            save_file(cpu_state(teacher), args.save_teacher)
    teacher.eval()
    bits = math.log(2)
    # a teacher that has memorised its training text says little there beyond the next token
    print(f"teacher: test {next_token_loss(teacher, test) / bits:.3f} bits per byte, validation "
          f"{next_token_loss(teacher, val) / bits:.3f}, on the students' training blocks "
          f"{next_token_loss(teacher, students_train) / bits:.3f} "
          f"({time.perf_counter() - started:.0f} s)")  # fmt: skip
    lam = args.on_policy or 0.5  # the on-policy arm's fraction, when --arms asks for it
    on_policy = f"KD, on-policy {lam:g}"
    # each arm: its label and how its targets are made (stores labelled only when asked for)
    recipes = {
        "ce": ("next-token CE", lambda: None),
        "full": ("KD, full logits", lambda: teacher),
        "top32": ("KD, top-32 store", lambda: label(32, CODE_BITS)),
        # the same top-32 logits nearly unquantised (16-bit codes): what the packing costs
        "top32-16bit": ("KD, top-32, 16-bit", lambda: label(32, 16)),
        "top32-7bit": ("KD, top-32, 7-bit", lambda: label(32, 7)),
        "top8": ("KD, top-8 store", lambda: label(8, CODE_BITS)),
        "on-policy": (on_policy, lambda: teacher),
    }

    def label(top: int, code_bits: int) -> TokenStore:
        return label_tokens(
            teacher, students_train, top=top, temperatures=(T,), code_bits=code_bits
        )

    default = [a for a in recipes if a not in ("on-policy", "top32-7bit")]
    wanted = args.arms.split(",") if args.arms else default
    if args.on_policy and not args.arms:
        wanted.append("on-policy")
    unknown = [a for a in wanted if a not in recipes]
    if unknown:
        raise SystemExit(f"unknown arms {unknown}; choose from {', '.join(recipes)}")
    arms = {recipes[a][0]: recipes[a][1]() for a in wanted}
    stores = {name: source for name, source in arms.items() if isinstance(source, TokenStore)}
    results: dict[str, list[float]] = {name: [] for name in arms}
    validation: dict[str, list[float]] = {name: [] for name in arms}
    for seed in range(args.seeds):
        for name, source in arms.items():
            torch.manual_seed(seed)
            student = gpt(tokenizer.vocab_size, layers=1, heads=4, width=128, context=BLOCK)
            fit_lm(student, students_train, val, source, temperature=T, alpha=ALPHA,
                   epochs=args.epochs,
                   lr=3e-3, batch_blocks=16, seed=seed,
                   on_policy=lam if name == on_policy else 0.0)  # fmt: skip
            results[name].append(next_token_loss(student, test) / bits)
            validation[name].append(next_token_loss(student, val) / bits)
    print(f"students (1 layer, {len(students_train)} of the {len(train)} training blocks), test "
          f"bits per byte over {args.seeds} seeds, T = {T:g}, alpha = {ALPHA:g}:")  # fmt: skip
    for name, values in results.items():
        line = f"  {name:<18} {mean_ci(values).format(1, 3)}"
        if name != "next-token CE" and "next-token CE" in results:
            line += f"   minus CE: {paired_difference(values, results['next-token CE']).describe(1, '', 3)}"
        line += f"   (validation {mean_ci(validation[name]).format(1, 3)})"
        print(line)
    for name, store in stores.items():
        print(f"{name}: {store.bytes_per_token:.1f} bytes per token")
    for packed in ("KD, top-32 store", "KD, top-32, 7-bit"):
        if packed in results and "KD, top-32, 16-bit" in results:
            print(f"{packed} minus 16-bit codes: "
                  f"{paired_difference(results[packed], results['KD, top-32, 16-bit']).describe(1, '', 3)}")  # fmt: skip
    if on_policy in results and "KD, full logits" in results:
        print(f"on-policy minus off-policy KD (both from the online teacher): "
              f"{paired_difference(results[on_policy], results['KD, full logits']).describe(1, '', 3)}")  # fmt: skip
    print(f"wall time {time.perf_counter() - started:.0f} s")


def share_of_blocks(train: Blocks, share: float) -> Blocks:
    """A seeded choice of about ``share`` of ``train``'s blocks (all of them for a share of 1):
    less data for the students than the teacher had (validation and test stay whole files)."""
    if share >= 1:
        return train
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))
    return train.take(order[: max(1, round(share * len(train)))].sort().values)


if __name__ == "__main__":
    main()
