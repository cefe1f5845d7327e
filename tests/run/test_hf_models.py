"""Hugging Face text classifiers from local folders, end to end from the command line: a tiny BERT
teacher and a word-level tokenizer, trained here on a generated three-topic corpus and saved with
``save_pretrained``; nothing is downloaded."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from softtargets.cli.app import app
from softtargets.files import read_jsonl

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

runner = CliRunner()

TOPICS = {
    "code": "python bug compile test loop function class error stack merge".split(),
    "food": "bread soup cook taste salt dinner bake spice fruit meal".split(),
    "sport": "goal match team score player coach league win ball run".split(),
}
COMMON = "the a and of to in is it that was for on with as at by this".split()


def _sentence(rng: random.Random, topic: str) -> str:
    n = rng.randint(6, 14)
    return " ".join(
        rng.choice(TOPICS[topic]) if rng.random() < 0.35 else rng.choice(COMMON) for _ in range(n)
    )


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, Path]:
    """``(texts.csv, teacher folder)``: 600 labelled sentences and a trained tiny BERT beside its
    tokenizer."""
    root = tmp_path_factory.mktemp("hf")
    rng = random.Random(0)
    rows = [(_sentence(rng, t), t) for t in TOPICS for _ in range(200)]
    rng.shuffle(rows)
    texts = root / "texts.csv"
    with open(texts, "w", newline="") as handle:
        csv.writer(handle).writerows([("text", "label"), *rows])
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    words.train_from_iterator(
        [r[0] for r in rows], trainers.WordLevelTrainer(special_tokens=["[PAD]", "[UNK]"])
    )
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]"
    )
    names = sorted(TOPICS)
    config = transformers.BertConfig(
        vocab_size=len(tokenizer), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=32, max_position_embeddings=32, num_labels=3,
        pad_token_id=tokenizer.pad_token_id, id2label=dict(enumerate(names)),
        label2id={n: i for i, n in enumerate(names)},
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config)
    encoded = tokenizer([r[0] for r in rows], padding="max_length", truncation=True,
                        max_length=16, return_tensors="pt")  # fmt: skip
    labels = torch.tensor([names.index(r[1]) for r in rows])
    optimizer = torch.optim.Adam(model.parameters(), 3e-3)
    for _ in range(150):
        batch = torch.randint(0, len(rows), (64,))
        loss = model(input_ids=encoded["input_ids"][batch],
                     attention_mask=encoded["attention_mask"][batch], labels=labels[batch]).loss  # fmt: skip
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    teacher = root / "teacher"
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    return texts, teacher


TEXT = ["--text-column", "text", "--max-length", "16"]


def test_a_hugging_face_teacher_distils_into_a_smaller_config_from_the_command_line(
    corpus, tmp_path
) -> None:
    texts, teacher = corpus
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "distill", "--data", str(texts), *TEXT, "--teacher", f"hf:{teacher}",
        "--student", f"hf-config:{teacher}", "--student-option", "num_hidden_layers=1",
        "--seeds", "2", "--epochs", "4", "--out", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    records = read_jsonl(out / "results.jsonl")
    teacher_record = next(r for r in records if r["role"] == "teacher")
    assert teacher_record["pretrained"] and teacher_record["test_accuracy"] > 0.9
    students = [r for r in records if r["role"] == "student"]
    assert len(students) == 4
    # the student is the teacher's family with one layer: fewer parameters
    assert students[0]["parameters"] < teacher_record["parameters"]
    meta = json.loads((out / "student.json").read_text())
    assert meta["hf"]["hf_config"]["num_hidden_layers"] == 1
    assert meta["class_names"] == sorted(TOPICS) and meta["text"]["text_column"] == "text"
    # served on new text, read through the saved tokenizer; exported and checked
    (tmp_path / "new.csv").write_text("text\nthe goal of the match was a win\n")
    served = runner.invoke(app, ["predict", "--model", str(out), "--data",
                                 str(tmp_path / "new.csv")])  # fmt: skip
    assert served.exit_code == 0, served.output
    header, row = served.output.strip().splitlines()
    assert header == "row,code,food,sport"
    assert abs(sum(float(p) for p in row.split(",")[1:]) - 1) < 1e-5
    exported = runner.invoke(app, ["export", "--model", str(out), "--format", "pt2"])
    assert exported.exit_code == 0, exported.output
    assert (out / "student.pt2").is_file()


def test_label_with_a_hugging_face_teacher_then_distil_from_the_store(corpus, tmp_path) -> None:
    texts, teacher = corpus
    store = tmp_path / "store.safetensors"
    result = runner.invoke(app, ["label", "--data", str(texts), *TEXT, "--teacher",
                                 f"hf:{teacher}", "--out", str(store), "--top-k", "2"])  # fmt: skip
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, [
        "distill", "--data", str(texts), *TEXT, "--tokenizer", str(teacher), "--store",
        str(store), "--student", "mlp", "--seeds", "2", "--epochs", "2", "--out",
        str(tmp_path / "run"),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert len(read_jsonl(tmp_path / "run" / "results.jsonl")) == 5


@pytest.mark.parametrize(
    "case, expected",
    [
        ("no config", "has no config.json"),
        ("no tokenizer", "holds no tokenizer"),
        ("other classes", "names its classes"),
        ("no such folder", "no such local folder"),
    ],
)
def test_bad_hugging_face_folders_are_one_line(corpus, tmp_path, case, expected) -> None:
    texts, teacher = corpus
    folder = tmp_path / "model"
    folder.mkdir()
    data = texts
    if case == "no config":
        (folder / "model.safetensors").write_bytes((teacher / "model.safetensors").read_bytes())
    elif case == "no tokenizer":
        for name in ("config.json", "model.safetensors"):
            (folder / name).write_bytes((teacher / name).read_bytes())
    elif case == "other classes":
        folder = teacher
        data = tmp_path / "renamed.csv"
        data.write_text(texts.read_text().replace(",sport", ",sports"))
    else:
        folder = tmp_path / "absent"
    out = tmp_path / "run"
    result = runner.invoke(app, ["distill", "--data", str(data), *TEXT, "--teacher",
                                 f"hf:{folder}", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert expected in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_without_the_extra_the_message_names_the_install_command(monkeypatch) -> None:
    import sys

    from softtargets.errors import SoftTargetsError
    from softtargets.extras import require

    monkeypatch.setitem(sys.modules, "transformers", None)  # as if not installed
    with pytest.raises(SoftTargetsError, match=r'pip install -e "\.\[hf\]"'):
        require("transformers", "hf")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(SoftTargetsError, match=r'pip install -e "\.\[onnx\]"'):
        require("onnxruntime", "onnx")


def test_an_image_classifier_config_trains_as_a_student_on_an_image_folder(tmp_path) -> None:
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for k in range(3):
        (tmp_path / "images" / f"class{k}").mkdir(parents=True)
        for i in range(12):
            pixels = rng.integers(0, 60, (16, 16, 3)) + 90 * k  # the class is the brightness
            Image.fromarray(pixels.astype(np.uint8)).save(
                tmp_path / "images" / f"class{k}" / f"{i}.png"
            )
    config = transformers.ViTConfig(
        image_size=16, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
        num_attention_heads=2, intermediate_size=32, num_labels=3,
    )  # fmt: skip
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "vit")
    out = tmp_path / "run"
    result = runner.invoke(app, [
        "distill", "--data", str(tmp_path / "images"), "--teacher", "cnn2d", "--student",
        f"hf-config:{tmp_path / 'vit'}", "--teacher-epochs", "5", "--epochs", "2", "--seeds",
        "2", "--out", str(out),
    ])  # fmt: skip
    assert result.exit_code == 0, result.output
    meta = json.loads((out / "student.json").read_text())
    assert meta["hf"]["text"] is False and meta["hf"]["hf_config"]["model_type"] == "vit"
    exported = runner.invoke(app, ["export", "--model", str(out), "--format", "pt2"])
    assert exported.exit_code == 0, exported.output
