"""One module per question about soft targets; each returns a result table, figures and a verdict.

| name | claim |
| --- | --- |
| similarity | soft targets carry the similarity structure between classes |
| temperature | the best temperature depends on the student's size |
| data-fraction | with soft targets a student learns from much less data |
| learning-rate | soft targets tolerate a much higher learning rate |
| gradient-variance | soft targets give less gradient variance between training cases |
| width | soft targets need far fewer neurons, the more so the harder the data |
| label-noise | a teacher's soft targets soften label noise |
| omit-class | dark knowledge: a class never seen in the transfer set is still learned |
| smoothing-vs-teacher | the gain is the teacher's information, not softening alone |
| methods | the newer distillation losses (DKD and others) beat Hinton's KD |
| lighter-student | soft targets carry a teacher's knowledge into a much lighter network |
| generalisation | soft targets narrow the train-test gap and calibrate better |
"""

from __future__ import annotations

import importlib

from softtargets.errors import SoftTargetsError

#: the protocol the studies follow (studies/PROTOCOLS.md): raised with every amendment, and
#: recorded in each study's results.json so that the report quotes it
PROTOCOL_VERSION = 5

#: study name -> module under softtargets.studies (imported when run)
STUDIES = {
    "similarity": "similarity",
    "temperature": "temperature",
    "data-fraction": "data_fraction",
    "learning-rate": "learning_rate",
    "gradient-variance": "gradient_variance",
    "width": "width",
    "label-noise": "label_noise",
    "omit-class": "omit_class",
    "smoothing-vs-teacher": "smoothing",
    "methods": "methods",
    "lighter-student": "lighter_student",
    "generalisation": "generalisation",
}


def study_module(name: str):  # noqa: ANN201 - a module

    if name not in STUDIES:
        raise SoftTargetsError(f"unknown study {name!r}; choose one of {', '.join(STUDIES)}")
    return importlib.import_module(f"softtargets.studies.{STUDIES[name]}")
