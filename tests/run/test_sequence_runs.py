"""The main job on text: ``softtargets distill --block-length`` trains a language-model teacher,
stores its top-k logits per position and distils students, in a locked, resumable run folder."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from softtargets.cli.app import app

runner = CliRunner()

TEACHER = ["--teacher-option", "layers=1", "--teacher-option", "width=16", "--teacher-option",
           "heads=2", "--teacher-epochs", "1", "--epochs", "1", "--block-length", "16",
           "--store-top", "4", "--batch-size", "8"]  # fmt: skip
TINY = [*TEACHER, "--student-option", "width=16", "--student-option", "heads=2"]


@pytest.fixture
def corpus(tmp_path):
    folder = tmp_path / "corpus"
    folder.mkdir()
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta"]
    for i in range(5):  # five files: whole files go to train, validation and test
        lines = [" ".join(words[(i + j + k) % 8] for k in range(6)) for j in range(12)]
        (folder / f"part{i}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return folder


def _records(out) -> list[dict]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


def test_distill_on_text_writes_teacher_store_students_and_a_report(tmp_path, corpus) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["distill", "--data", str(corpus), *TINY, "--seeds", "2",
                                 "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    records = _records(out)
    teacher = [r for r in records if r["role"] == "teacher"]
    students = [r for r in records if r["role"] == "student"]
    assert len(teacher) == 1 and {(r["method"], r["seed"]) for r in students} == {
        ("hard", 0),
        ("kd", 0),
        ("hard", 1),
        ("kd", 1),
    }
    for r in [*teacher, *students]:  # bits are nats / ln 2, on held-out files
        assert math.isfinite(r["test_loss"]) and r["test_tokens"] > 0
        assert r["test_bits_per_token"] == pytest.approx(r["test_loss"] / math.log(2))
    for name in ("teacher.safetensors", "store.safetensors", "student-kd-seed1.safetensors"):
        assert (out / name).stat().st_size > 0
    report = (out / "report.md").read_text()
    assert "test bits per byte" in report and "top-4 store" in report
    assert "bits per byte" in result.output and "bytes per token" in result.output


def test_a_text_run_resumes_keeping_its_teacher_store_and_finished_students(tmp_path, corpus):
    out = tmp_path / "run"
    first = runner.invoke(app, ["distill", "--data", str(corpus), *TINY, "--seeds", "1",
                                "--out", str(out)])  # fmt: skip
    assert first.exit_code == 0, first.output
    teacher_bytes = (out / "teacher.safetensors").read_bytes()
    # A run killed mid-fit left no record of that fit; finished ones are kept and the next
    # invocation trains only what is missing (here: a second seed).
    again = runner.invoke(app, ["distill", "--data", str(corpus), *TINY, "--seeds", "2",
                                "--out", str(out)])  # fmt: skip
    assert again.exit_code == 0, again.output
    assert "teacher: reloaded" in again.output and "store: reloaded" in again.output
    assert "2 fits kept" in again.output
    assert (out / "teacher.safetensors").read_bytes() == teacher_bytes
    students = [r for r in _records(out) if r["role"] == "student"]
    assert sorted((r["method"], r["seed"]) for r in students) == [
        ("hard", 0), ("hard", 1), ("kd", 0), ("kd", 1)
    ]  # fmt: skip


def test_on_policy_students_learn_from_the_teacher_on_their_own_samples(tmp_path, corpus):
    out = tmp_path / "run"
    result = runner.invoke(app, ["distill", "--data", str(corpus), *TINY, "--seeds", "1",
                                 "--on-policy", "0.5", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 0, result.output
    students = {r["method"]: r for r in _records(out) if r["role"] == "student"}
    assert students["kd"]["on_policy"] == 0.5 and "on_policy" not in students["hard"]
    assert "on-policy on 50% of steps" in (out / "report.md").read_text()


@pytest.mark.parametrize(
    "change, message",
    [
        (["--temperature", "4", "--store-temperatures", "1,2"], "add it to --store-temperatures"),
        (["--store-temperatures", "1,x"], "positive numbers separated by commas"),
        (["--store-top", "300"], "keeps the whole vocabulary"),
        (["--tokenizer", "somewhere"], "tokenizer folder somewhere does not exist"),
        (["--block-length", "4096"], "shorter than one block"),
        (["--on-policy", "1.5"], "on_policy"),
        (["--optimizer", "sgd"], "leave out the student's optimizer ('sgd')"),
        (["--store", "elsewhere.safetensors"], "not a readable token store"),
    ],
)
def test_bad_text_runs_are_one_line_and_write_nothing(tmp_path, corpus, change, message):
    out = tmp_path / "run"
    result = runner.invoke(app, ["distill", "--data", str(corpus), *TINY, *change,
                                 "--out", str(out)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists() and not list(tmp_path.glob(".*.tmp"))  # nor a token file


def test_a_student_that_is_not_a_language_model_is_refused(tmp_path, corpus) -> None:
    out = tmp_path / "run"
    result = runner.invoke(app, ["distill", "--data", str(corpus), *TEACHER, "--student", "mlp",
                                 "--out", str(out)])  # fmt: skip
    assert result.exit_code == 2 and "fails on (1, 16) token ids" in result.output
    assert "a language model maps them to (1, 16, 258) logits" in result.output
    assert not out.exists()


def test_a_file_that_is_not_utf8_is_named(tmp_path, corpus) -> None:
    (corpus / "binary.txt").write_bytes(b"\xff\xfe\x00 not text")
    out = tmp_path / "run"
    result = runner.invoke(app, ["distill", "--data", str(corpus), *TINY, "--out", str(out)])
    assert result.exit_code == 2 and "binary.txt" in result.output
    assert not out.exists()


def test_a_hugging_face_causal_lm_teaches_a_smaller_one_of_its_family(tmp_path, corpus) -> None:
    """``--teacher hf:FOLDER`` (a saved GPT-2 and its tokenizer, nothing downloaded) is used as
    trained; ``--student hf-config:FOLDER`` builds its family smaller; the folder's tokenizer
    reads the text, so bits are per token."""
    transformers = pytest.importorskip("transformers")
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    words = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    texts = [p.read_text() for p in sorted(corpus.iterdir())]
    special = ["[PAD]", "[UNK]", "[EOS]"]
    words.train_from_iterator(texts, trainers.WordLevelTrainer(special_tokens=special))
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=words, pad_token="[PAD]", unk_token="[UNK]", eos_token="[EOS]"
    )
    config = transformers.GPT2Config(vocab_size=len(tokenizer), n_positions=32, n_embd=16,
                                     n_layer=2, n_head=2)  # fmt: skip
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    folder = tmp_path / "gpt2"
    transformers.GPT2LMHeadModel(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    out = tmp_path / "run"
    args = ["distill", "--data", str(corpus), "--block-length", "8", "--teacher",
            f"hf:{folder}", "--student", f"hf-config:{folder}", "--student-option", "n_layer=1",
            "--epochs", "1", "--seeds", "1", "--store-top", "4", "--batch-size", "8",
            "--out", str(out)]  # fmt: skip
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "pretrained weights from" in result.output and "bits per token" in result.output
    records = _records(out)
    teacher = next(r for r in records if r["role"] == "teacher")
    assert teacher["pretrained"] and "best_epoch" not in teacher  # used as trained, not fitted
    students = [r for r in records if r["role"] == "student"]
    assert {r["method"] for r in students} == {"hard", "kd"}
    assert all(r["parameters"] < teacher["parameters"] for r in students)
    # the saved teacher is the folder's model, unchanged
    from safetensors.torch import load_file

    saved = load_file(out / "teacher.safetensors")
    original = transformers.GPT2LMHeadModel.from_pretrained(folder).state_dict()
    assert torch.equal(saved["model.transformer.wte.weight"], original["transformer.wte.weight"])
    # the named student is rebuilt from its saved config (the source folder's model is not
    # needed) and reads text with the folder's tokenizer
    described = json.loads((out / "student.json").read_text())
    assert described["hf"]["causal_lm"] and described["hf"]["hf_config"]["n_layer"] == 1
    assert described["language_model"]["tokenizer"] == str(folder.resolve())
    scored = runner.invoke(app, ["predict", "--model", str(out), "--data", str(corpus)])
    assert scored.exit_code == 0, scored.output
    assert scored.output.splitlines()[0] == "file,tokens,bits_per_token"
    written = runner.invoke(app, ["predict", "--model", str(out), "--prompt", "alpha beta",
                                  "--tokens", "3"])  # fmt: skip
    # word-level tokens, spaced by the decoder (a special token drawn is not written)
    assert written.exit_code == 0 and written.output.startswith("alpha beta ")
    assert 2 <= len(written.output.split()) <= 5


def test_label_once_distil_many_from_another_runs_store(tmp_path, corpus) -> None:
    first = tmp_path / "first"
    result = runner.invoke(app, ["distill", "--data", str(corpus), *TINY, "--seeds", "1",
                                 "--out", str(first)])  # fmt: skip
    assert result.exit_code == 0, result.output
    store = first / "store.safetensors"
    second = tmp_path / "second"
    result = runner.invoke(app, ["distill", "--data", str(corpus), *TINY, "--seeds", "1",
                                 "--store", str(store), "--out", str(second)])  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "no teacher run" in result.output and not (second / "teacher.safetensors").exists()
    students = {r["method"]: r for r in _records(second) if r["role"] == "student"}
    assert set(students) == {"hard", "kd"}
    assert "stored logits" in (second / "report.md").read_text()
    # the same student from the store as from the run that made it: the same targets and seed
    made = {r["method"]: r for r in _records(first) if r["role"] == "student"}
    assert students["kd"]["test_loss"] == pytest.approx(made["kd"]["test_loss"], rel=1e-5)
    # a store at another temperature, or on-policy with a store: one line, nothing written
    for change, message in ((["--temperature", "3"], "not at --temperature 3"),
                            (["--on-policy", "0.5"], "not --store")):  # fmt: skip
        out = tmp_path / f"bad{len(change)}{change[0]}"
        bad = runner.invoke(app, ["distill", "--data", str(corpus), *TINY, "--store", str(store),
                                  *change, "--out", str(out)])  # fmt: skip
        assert bad.exit_code == 2 and message in bad.output, bad.output
        assert not out.exists()


def test_a_student_whose_logits_are_capped_is_refused(tmp_path, corpus) -> None:
    """Its chunked loss forms hidden @ output_weight.T: a student whose own logits are anything
    else (here scaled by 0.5) would be trained as another function."""
    (tmp_path / "capped.py").write_text(
        "from softtargets.training.gpt import GPT\n"
        "class Capped(GPT):\n"
        "    def forward(self, ids):\n"
        "        return 0.5 * super().forward(ids)\n"
        "def capped(num_classes):\n"
        "    return Capped(num_classes, 1, 2, 16, 16)\n"
    )
    out = tmp_path / "run"
    result = runner.invoke(app, ["distill", "--data", str(corpus), *TEACHER, "--student",
                                 f"{tmp_path / 'capped.py'}:capped", "--out", str(out)])  # fmt: skip
    assert result.exit_code == 2 and "are not hidden(ids) @ output_weight.T" in result.output
    assert not out.exists()


def test_language_model_runs_get_their_own_default_models_and_trainings() -> None:
    from softtargets.cli.options import build_distill_config
    from softtargets.config import sequence_training

    config = build_distill_config(None, data="stdlib", block_length=128, student_epochs=3,
                                  student_option=["width=64"])  # fmt: skip
    assert config.teacher.name == config.student.name == "gpt"
    assert config.teacher_training == sequence_training("teacher")  # not 40 classifier epochs
    assert config.student_training.epochs == 3  # the flag, on the language-model default
    assert config.student_training.batch_size == sequence_training("student").batch_size
    assert config.student.options["width"] == 64 and config.student.options["layers"] == 1
    classifier = build_distill_config(None, data="mnist1d")
    assert classifier.student_training.epochs == 100 and classifier.teacher.name == "cnn1d"


@pytest.mark.parametrize(
    "change, message",
    [
        ([], "label runs a trained teacher: give --teacher-weights"),
        (["--teacher-weights", "WEIGHTS", "--top-k", "258"], "--top-k must be from 1 to 257"),
        (
            ["--teacher-weights", "WEIGHTS", "--teacher-option", "width=32"],
            "does not fit the teacher",
        ),
        (["--teacher-weights", "WEIGHTS", "--stream", "--top-k", "258"], "from 1 to 257"),
    ],
)
def test_bad_text_labelling_is_one_line_and_writes_nothing(tmp_path, corpus, change, message):
    run = tmp_path / "run"
    made = runner.invoke(app, ["distill", "--data", str(corpus), *TINY, "--seeds", "1",
                               "--out", str(run)])  # fmt: skip
    assert made.exit_code == 0, made.output
    weights = str(run / "teacher.safetensors")
    out = tmp_path / "store.safetensors"
    result = runner.invoke(app, ["label", "--data", str(corpus), "--block-length", "16",
                                 *TEACHER[:6], *[weights if c == "WEIGHTS" else c for c in change],
                                 "--out", str(out)])  # fmt: skip
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert not out.exists()


def test_stream_reads_the_corpus_from_a_token_file_to_the_same_run(
    tmp_path, corpus, monkeypatch, same_token_store
):
    for part in corpus.iterdir():  # 5 files of about 4 kB: 160 kB as int64 blocks in memory
        part.write_text(part.read_text() * 10, encoding="utf-8")
    memory, streamed = tmp_path / "memory", tmp_path / "streamed"
    args = ["distill", "--data", str(corpus), *TINY, "--seeds", "1"]
    assert runner.invoke(app, [*args, "--out", str(memory)]).exit_code == 0
    result = runner.invoke(app, [*args, "--stream", "--out", str(streamed)])
    assert result.exit_code == 0, result.output
    manifest = json.loads((streamed / ".softtargets-run.json").read_text())
    assert "tokens.bin" in manifest["files"] and (streamed / "tokens.bin").stat().st_size > 0
    for one, two in zip(_records(memory), _records(streamed), strict=True):
        assert one["test_loss"] == two["test_loss"] and one["key"] == two["key"]
    # 147 kB: the student (16 bytes a parameter: 123 kB) fits, the corpus in memory does not,
    # so the run reads it from a token file without being asked
    monkeypatch.setenv("SOFTTARGETS_MEMORY_BUDGET_MB", "0.14")
    large = tmp_path / "large"
    result = runner.invoke(app, [*args, "--out", str(large)])
    assert result.exit_code == 0, result.output
    assert "reading it from tokens.bin" in " ".join(result.output.split())
    assert (large / "tokens.bin").stat().st_size == (streamed / "tokens.bin").stat().st_size
    # label reads such a corpus from a token file too (removed after), and writes its store as
    # it labels: the store the in-memory corpus gives, tensor for tensor
    label = ["label", "--data", str(corpus), "--block-length", "16", *TEACHER[:6],
             "--teacher-weights", str(memory / "teacher.safetensors"), "--top-k", "4"]  # fmt: skip
    labelled = runner.invoke(app, [*label, "--out", str(tmp_path / "large.safetensors")])
    assert labelled.exit_code == 0, labelled.output
    assert "reading the corpus from a token file" in " ".join(labelled.output.split())
    monkeypatch.delenv("SOFTTARGETS_MEMORY_BUDGET_MB")
    in_memory = runner.invoke(app, [*label, "--out", str(tmp_path / "memory.safetensors")])
    assert in_memory.exit_code == 0, in_memory.output
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == [
        "large.safetensors",
        "memory.safetensors",
    ]  # no token file left beside them
    same_token_store(tmp_path / "large.safetensors", tmp_path / "memory.safetensors")


def test_the_runs_language_model_student_is_named_served_and_exported(tmp_path, corpus) -> None:
    from softtargets.config import DistillConfig, load_config
    from softtargets.run.sequence_data import load_sequence_splits

    out = tmp_path / "run"
    made = runner.invoke(app, ["distill", "--data", str(corpus), *TINY, "--seeds", "2",
                               "--out", str(out)])  # fmt: skip
    assert made.exit_code == 0, made.output
    described = json.loads((out / "student.json").read_text())
    students = [r for r in _records(out) if r["role"] == "student"]
    best = min(students, key=lambda r: r["val_loss"])  # validation chose it, not the test set
    assert (described["method"], described["seed"]) == (best["method"], best["seed"])
    assert described["language_model"] == {"block_length": 16, "vocab_size": 258,
                                           "tokenizer": None, "unit": "byte"}  # fmt: skip
    report = (out / "report.md").read_text()  # what it costs to run, beside its teacher
    costs = report.split("## What the student costs to run")[1].split("\n\n")[1].splitlines()
    teacher = next(r for r in _records(out) if r["role"] == "teacher")
    assert costs[2].startswith(f"| teacher | {teacher['parameters']:,} |")
    assert costs[3].startswith(f"| student | {best['parameters']:,} |")
    assert costs[3].endswith(f"| {best['test_bits_per_token']:.3f} |")
    scored = runner.invoke(app, ["predict", "--model", str(out), "--data", str(corpus)])
    assert scored.exit_code == 0, scored.output
    rows = [line.split(",") for line in scored.output.strip().splitlines()]
    assert rows[0] == ["file", "tokens", "bits_per_byte"] and len(rows) == 6
    # the held-out files' bits, weighted by their tokens, are the student's test bits per byte
    test = load_sequence_splits(load_config(DistillConfig, out / "config.yaml")).test
    held_out = {test.files[i] for i in test.file_index.unique().tolist()}
    counted = [(int(n), float(b)) for f, n, b in rows[1:] if f in held_out]
    assert sum(n for n, _ in counted) == best["test_tokens"]
    assert sum(n * b for n, b in counted) / best["test_tokens"] == pytest.approx(
        best["test_bits_per_token"], rel=1e-5
    )
    written = runner.invoke(app, ["predict", "--model", str(out), "--prompt", "alpha",
                                  "--tokens", "8"])  # fmt: skip
    assert written.exit_code == 0 and written.output.startswith("alpha")
    too_long = runner.invoke(app, ["predict", "--model", str(out), "--prompt", "alpha",
                                   "--tokens", "20"])  # fmt: skip
    assert too_long.exit_code == 2 and "exceed the model's context of 16 tokens" in too_long.output
    for fmt in ("pt2", "onnx"):
        exported = runner.invoke(app, ["export", "--model", str(out), "--format", fmt])
        assert exported.exit_code == 0, exported.output
        difference = float(" ".join(exported.output.split()).rsplit("at most ", 1)[1])
        assert difference < 1e-4 and (out / f"student.{fmt}").stat().st_size > 0
    import torch

    from softtargets.run.students import load_saved

    ids = torch.randint(0, 258, (3, 5))  # shorter than a block: the sequence length is free
    expected = load_saved(out).model(ids)
    program = torch.export.load(str(out / "student.pt2")).module()
    torch.testing.assert_close(program(ids), expected, atol=1e-4, rtol=1e-4)


def test_store_top_0_keeps_no_store_and_runs_the_teacher_on_every_batch(tmp_path, corpus):
    stored, online = tmp_path / "stored", tmp_path / "online"
    args = ["distill", "--data", str(corpus), *TINY, "--seeds", "1"]
    assert runner.invoke(app, [*args, "--out", str(stored)]).exit_code == 0
    result = runner.invoke(app, [*args, "--store-top", "0", "--out", str(online)])
    assert result.exit_code == 0, result.output
    assert not (online / "store.safetensors").exists() and "store: none" in result.output
    assert "teacher run online on every batch" in (online / "report.md").read_text()
    # the same teacher (seeded alike) and CE students; its full logits teach otherwise than its
    # top-4 store
    kd = [next(r for r in _records(out) if r["method"] == "kd") for out in (stored, online)]
    hard = [next(r for r in _records(out) if r["method"] == "hard") for out in (stored, online)]
    assert hard[0]["test_loss"] == hard[1]["test_loss"]
    assert kd[0]["test_loss"] != kd[1]["test_loss"]


def test_prompt_completion_examples_distil_and_score_on_their_completions(tmp_path) -> None:
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta"]
    lines = [json.dumps({"prompt": f"reverse {words[i % 6]} {words[(i + 1) % 6]}:",
                         "completion": f" {words[(i + 1) % 6]} {words[i % 6]}"})
             for i in range(30)]  # fmt: skip
    data = tmp_path / "examples.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    args = [a if a != "16" else "48" for a in TINY]  # a block holds a whole example
    made = runner.invoke(app, ["distill", "--data", str(data), *args, "--seeds", "1",
                               "--out", str(out)])  # fmt: skip
    assert made.exit_code == 0, made.output
    assert "30 examples" in made.output and "held-out examples" in made.output
    report = (out / "report.md").read_text()
    assert "split by\nexample" in report and "completion's tokens only" in report
    teacher = next(r for r in _records(out) if r["role"] == "teacher")
    from softtargets.config import DistillConfig, load_config
    from softtargets.run.sequence_data import load_sequence_splits

    test = load_sequence_splits(load_config(DistillConfig, out / "config.yaml")).test
    # bits over the completions: each is its words, a space and <eos>, never the prompt
    completions = [json.loads(lines[int(test.files[i].rsplit(":", 1)[1]) - 1])["completion"]
                   for i in test.file_index.tolist()]  # fmt: skip
    assert teacher["test_tokens"] == sum(len(c) + 1 for c in completions)
    scored = runner.invoke(app, ["predict", "--model", str(out), "--data", str(data)])
    assert scored.exit_code == 0, scored.output
    _, tokens, _ = scored.output.strip().splitlines()[1].split(",")
    assert int(tokens) == sum(len(json.loads(line)["completion"]) + 1 for line in lines)


def test_conversations_distil_with_a_tokenizers_chat_template(tmp_path, chat_tokenizer) -> None:
    words = ["alpha", "beta", "gamma", "delta"]
    lines = [json.dumps({"messages": [
        {"role": "user", "content": f"what is {words[i % 4]}"},
        {"role": "assistant", "content": f"{words[(i + 1) % 4]} {words[(i + 2) % 4]}"}]})
        for i in range(24)]  # fmt: skip
    data = tmp_path / "chats.jsonl"
    data.write_text("\n".join(lines) + "\n", encoding="utf-8")
    out = tmp_path / "run"
    made = runner.invoke(app, ["distill", "--data", str(data), "--tokenizer", str(chat_tokenizer),
                               *TINY, "--seeds", "1", "--out", str(out)])  # fmt: skip
    assert made.exit_code == 0, made.output
    said = " ".join(made.output.split())
    assert "24 examples" in said and "bits per token" in said
    held_out = int(said.split(" test blocks")[0].rsplit(" ", 1)[1])
    teacher = next(r for r in _records(out) if r["role"] == "teacher")
    # each held-out conversation counts its answer's two words and the template's <end>
    assert held_out > 0 and teacher["test_tokens"] == 3 * held_out
