"""What every study shares: its config, the teacher cache, training grids, and the files it writes.

A study is a module with ``TITLE``, ``CLAIM`` and ``run(ctx) -> StudyOutput``, and ``OWN_MODELS``:
which of the user's models (``"teacher"``, ``"student"``) it can test its claim with (default:
both; a study on a controlled task of its own takes neither, and says so). The user's teacher
(``--teacher``, ``--teacher-weights`` or ``--store``) stands in for the preset teacher of the
user's data; the user's student for the MLP of ``student_hidden``. :func:`run_study` gives it a
:class:`StudyContext` and writes ``runs/study-NAME/``:

| file | holds |
| --- | --- |
| ``results.csv`` / ``results.json`` | one row per trained model or measured point; the JSON adds the summary, verdict and run facts |
| ``config.yaml`` | the resolved study config |
| ``*.png`` | the figures |
| ``section.md`` | the study's section of the report |

The study directory is a :class:`~softtargets.run.folder.RunFolder` (locked while the study runs,
with a manifest of what it wrote). Teachers are trained once per dataset (and label-noise rate)
and stored with the core's store, each in a run folder of its own under ``teachers/`` beside the
study directories, so every study reuses them; two studies that need the same teacher at once
wait for each other instead of training it twice.
"""

from __future__ import annotations

import json
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from softtargets import distributed
from softtargets.config import (
    QUICK_SAMPLES,
    STANDARD_SAMPLES,
    DataConfig,
    DistillConfig,
    StudyConfig,
    dump_config,
    quick_teacher,
    teacher_model,
    teacher_training,
)
from softtargets.errors import SoftTargetsError
from softtargets.run.folder import RunFolder, check_out_of_inputs, config_key
from softtargets.run.report import StudyOutput, rows_csv, section_markdown
from softtargets.run.stats import over_teachers
from softtargets.run.teacher import TeacherRun, run_teacher
from softtargets.studies import PROTOCOL_VERSION, study_module
from softtargets.training.fit_many import Member, fit_many
from softtargets.training.models import build_model
from softtargets.training.weights import file_fingerprint

#: the teacher seeds of successive passes lie this far apart (a study's own extra teachers use
#: seeds 1, 2, ... within a pass)
TEACHER_SEED_STEP = 1000


@dataclass
class StudyContext:
    """Data, teachers and training for one study run."""

    name: str
    config: StudyConfig
    folder: RunFolder
    progress: Any = None
    log: Callable[[str], None] = lambda message: None
    _teachers: dict[str, TeacherRun] = field(default_factory=dict)
    #: which of the study's independently trained teachers this pass uses (0, 1, ...), and how
    #: many passes there are: teachers are the unit of replication (:func:`run_study`)
    replicate: int = 0
    replicates: int = 1

    @property
    def out_dir(self) -> Path:
        return self.folder.root

    def path(self, name: str) -> Path:
        """Where to write the study's file ``name`` (recorded in the folder's manifest); the
        passes with other teachers than the first keep theirs beside it, named ``-teacherN``."""
        if self.replicate:
            stem, dot, suffix = name.rpartition(".")
            name = (
                f"{stem}-teacher{self.replicate}{dot}{suffix}"
                if dot
                else f"{name}-{self.replicate}"
            )
        return self.folder.path(name)

    @property
    def seeds(self) -> list[int]:
        return list(range(self.config.seeds))

    @property
    def quick(self) -> bool:
        return self.config.quick

    def distill_config(
        self,
        data: str | None = None,
        label_noise: float = 0.0,
        options: dict[str, Any] | None = None,
        yours: bool = True,
    ) -> DistillConfig:
        """The teacher settings used for ``data`` (a built-in name or a file): the user's teacher
        or store when they gave one and this is the plain teacher of their data (``yours``)."""
        name = data or self.config.data
        plain = options is None  # the data as the study config has it, not a variant of it
        if options is None:
            samples = QUICK_SAMPLES if self.quick else STANDARD_SAMPLES
            options = {"mnist1d": {"num_samples": samples}}.get(name, {})
        teacher, training = teacher_model(name), teacher_training()
        if self.quick:
            teacher, training = quick_teacher(teacher, training)
        own = name == self.config.data  # the user's data: its own test file, if given
        store = None
        if own and yours and plain and not label_noise:
            store = self.config.store
            if self.config.teacher is not None:
                teacher = self.config.teacher  # the user's, in place of the preset
        # Each pass's teachers are trained independently (their own initial weights, batch
        # order and dropout) on the pass's own split of the data; the first pass's are the
        # study's as before. Every teacher a study makes goes through here, its own variants
        # (a smoothed or a self-distillation teacher) too, so none sees another pass's test rows.
        return DistillConfig(
            data=DataConfig(
                name=name,
                options=options,
                label_noise=label_noise,
                test=self.config.test_data if own else None,
                split_seed=self.replicate,
            ),
            teacher=teacher,
            teacher_training=training,
            store=store,
            first_seed=TEACHER_SEED_STEP * self.replicate,
        )

    def teacher(
        self,
        data: str | None = None,
        label_noise: float = 0.0,
        options: dict[str, Any] | None = None,
        classes: list[int] | None = None,
        seed: int = 0,
    ) -> TeacherRun:
        """The teacher (fitted once, then reloaded from ``teachers/``) with its store and splits.
        ``seed``: another independently trained teacher of the same settings and data (its
        initial weights, batch order and dropout; the split stays)."""
        # the user's teacher stands for the teacher of their data, not for another one
        yours = classes is None and seed == 0
        config = self.distill_config(data, label_noise, options, yours=yours)
        config.data.classes = classes
        config.first_seed += seed  # another teacher of the same pass (its own seed)
        return self.teacher_for(config)

    def teacher_for(self, config: DistillConfig) -> TeacherRun:
        """The teacher of ``config``, cached in ``teachers/`` beside the study directories."""

        key = config_key(config, teacher_only=True)
        if config.store is not None:  # the store is the teacher: its content keys the cache
            key = f"store-{file_identity(config.store)}"
        elif config.teacher.weights is not None:
            key = f"{key}-{file_identity(config.teacher.weights)}"
        if key not in self._teachers:
            where = self.out_dir.parent / "teachers" / f"{config.data.name.replace('/', '_')}-{key}"
            self._teachers[key] = run_teacher(
                config, where, wait=True, progress=self.progress, log=self.log
            )
        return self._teachers[key]

    def train(
        self,
        part: TeacherRun,
        members: Sequence[Member],
        hidden: Sequence[Sequence[int]] | None = None,
        **overrides: Any,
    ) -> list:
        """Train one student per member, all at once (:func:`fit_many`), selected on validation."""
        data = part.splits.train
        own = self.config.student
        if own is not None and hidden is not None:
            raise SoftTargetsError(
                f"the {self.name} study varies the width of its MLP students, so it cannot take "
                "--student; leave it out"
            )
        if own is not None:
            models = [
                build_model(own.name, data.feature_shape, data.num_classes, seed=m.seed,
                            **own.options)
                for m in members
            ]  # fmt: skip
        else:
            widths = hidden or [self.config.student_hidden] * len(members)
            models = [
                build_model(
                    "mlp", data.feature_shape, data.num_classes, seed=m.seed, hidden=list(w)
                )
                for m, w in zip(members, widths, strict=True)
            ]
        training = self.config.student_training
        options = training.fit_options() if own is not None else training.stacked_options()
        if own is not None:  # fit_many trains them one at a time, through fit
            options = {k: v for k, v in options.items() if k not in ("precision", "compile")}
        settings = {**options, **overrides}
        common = dict(val=part.splits.val, test=part.splits.test, device=part.device, **settings)
        if not distributed.active():
            return fit_many(models, data, members, progress=self.progress, **common)
        # Under torchrun the members are spread over the processes, each trained whole on one,
        # and every process gets every result (the study goes on alike on each; rank 0 writes).
        mine = list(distributed.my_share(len(members)))
        with distributed.alone():
            local = fit_many(
                [models[i] for i in mine], data, [members[i] for i in mine],
                progress=self.progress, **common,
            ) if mine else []  # fmt: skip
        results: list = [None] * len(members)
        for share in distributed.gather_to_all(list(zip(mine, local, strict=True))):
            for i, result in share:
                results[i] = result
        return results


def _reported(reported: Any, verdict: Any) -> dict[str, Any]:
    """The declared size as results.json keeps it, with the unit and scale its verdict is
    written in (a share of 0.868 is shown as 86.80%)."""
    worded = verdict.parts[0] if verdict.parts else verdict
    _, scale, unit, _ = worded.wording
    return {**vars(reported), "scale": scale, "unit": unit}


def _over_teachers(outputs: list[StudyOutput]) -> StudyOutput:
    """One output from the passes of every teacher: every pass's rows (a ``teacher_replicate`` column
    added), the first pass's summary and figures, and the verdict judged again with teachers as
    the unit (:func:`~softtargets.run.stats.over_teachers`); each pass's own verdict is listed in
    the notes."""
    first = outputs[0]
    if len(outputs) == 1:
        return first
    rows = [{"teacher_replicate": t, **row} for t, out in enumerate(outputs) for row in out.rows]
    verdict = over_teachers([out.verdict for out in outputs])
    per_teacher = "; ".join(
        f"teacher {t + 1}: {out.verdict.label}" for t, out in enumerate(outputs)
    )
    notes = (
        f"{first.notes.strip()}\n\nTeachers as the unit: {len(outputs)} teachers, each trained "
        f"independently on its own split, its students' seeds nested inside; the table, "
        f"figures and notes above are the first teacher's (the others' figures are saved beside "
        f"them, named -teacherN). Each teacher alone: {per_teacher}."
    )
    return replace(first, rows=rows, verdict=verdict, notes=notes)


def file_identity(path: str) -> str:
    """A short hash of a file's content (a user's weights or store key the study's teacher)."""
    return file_fingerprint(path)[:12]


def check_own_models(name: str, module: Any, config: StudyConfig) -> None:
    """Refuse, in one line, a user's model that study ``name`` cannot test its claim with."""
    takes = getattr(module, "OWN_MODELS", ("teacher", "student"))
    given = [
        role
        for role, value in (
            ("teacher", config.teacher or config.store),
            ("student", config.student),
        )
        if value is not None
    ]
    refused = [role for role in given if role not in takes]
    if refused:
        why = getattr(module, "OWN_MODELS_WHY", "it runs on a controlled task of its own")
        accepted = " and ".join(f"--{role}" for role in takes) or "neither"
        raise SoftTargetsError(
            f"the {name} study cannot take your {refused[0]}: {why}; it takes {accepted}"
        )
    if not getattr(module, "TAKES_DATA", True) and config.data != StudyConfig().data:
        raise SoftTargetsError(
            f"the {name} study runs on a task of its own ({module.OWN_MODELS_WHY}), so it takes "
            "no --data; leave it out"
        )
    if config.teacher is not None and config.store is not None:
        raise SoftTargetsError("give --teacher or --store, not both")
    if config.store is not None and getattr(module, "NEEDS_TEACHER_MODEL", False):
        raise SoftTargetsError(
            f"the {name} study reads the teacher model itself (its size), so it needs --teacher, "
            "not --store"
        )


def run_study(
    name: str,
    config: StudyConfig,
    out_dir: str | Path,
    *,
    progress: Any = None,
    log: Callable[[str], None] = lambda message: None,
    command: str | None = None,
) -> dict[str, Any]:
    """Run study ``name`` and write its directory; returns the JSON written to results.json."""

    module = study_module(name)
    check_own_models(name, module, config)
    check_out_of_inputs(out_dir, [config.data, config.test_data])
    with RunFolder.open(out_dir, log=log) as folder:
        return _run_in(folder, name, module, config, progress, log, command)


def _run_in(
    folder: RunFolder,
    name: str,
    module: Any,
    config: StudyConfig,
    progress: Any,
    log: Callable[[str], None],
    command: str | None,
) -> dict[str, Any]:
    """:func:`run_study` inside its open run folder."""
    resolved = config.resolved()
    folder.write_text("config.yaml", dump_config(resolved))
    started = time.perf_counter()
    yours = resolved.teacher is not None or resolved.store is not None
    passes = 1 if yours else resolved.teachers  # a user's own teacher is one teacher
    outputs: list[StudyOutput] = []
    for replicate in range(passes):
        if passes > 1:
            log(f"{name}: teacher {replicate + 1} of {passes}")
        ctx = StudyContext(name, resolved, folder, progress, log, replicate=replicate,
                           replicates=passes)  # fmt: skip
        outputs.append(module.run(ctx))
    seconds = time.perf_counter() - started
    output = _over_teachers(outputs)
    command = command or " ".join(shlex.quote(a) for a in ["softtargets", *sys.argv[1:]])
    facts = {
        "study": name,
        "title": module.TITLE,
        "protocol": PROTOCOL_VERSION,
        "seeds": output.seeds or ctx.seeds,
        "teachers": passes,
        "seconds": round(seconds, 1),
        "command": command,
        "config": resolved.model_dump(mode="json"),
        **(
            {"reported": _reported(module.REPORTED, output.verdict)}
            if hasattr(module, "REPORTED")
            else {}
        ),  # fmt: skip
    }
    payload = {
        **facts,
        "verdict": output.verdict.public(),
        "verdicts_per_teacher": [o.verdict.public() for o in outputs],
        "summary": output.summary,
        "rows": output.rows,
        "figures": [f.name for f in output.figures],
    }
    folder.write_text("results.csv", rows_csv(output.rows))
    folder.write_text("results.json", json.dumps(payload, indent=1, default=float) + "\n")
    folder.write_text("section.md", section_markdown(module.TITLE, output, facts))
    return payload
