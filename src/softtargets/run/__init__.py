"""The run wing: jobs that write a run folder, and every report.

| module | holds |
| --- | --- |
| :mod:`~softtargets.run.folder` | ``RunFolder``: manifest (what it wrote, as it wrote it), records, settings keys |
| :mod:`~softtargets.run.lock` | the OS lock a job holds on its folder |
| :mod:`~softtargets.run.teacher` | the main job's first half: data, splits, the teacher and its store |
| :mod:`~softtargets.run.distill` | the main job: students over seeds and methods |
| :mod:`~softtargets.run.report` | every table, paired difference and report (run, study, all studies) |
| :mod:`~softtargets.run.figures` | the figures those reports show |
| :mod:`~softtargets.run.html` | Markdown to a self-contained HTML page |
| :mod:`~softtargets.run.stats` | means, intervals, paired differences, sign tests, verdicts |
| :mod:`~softtargets.run.proportions` | regression on proportions (``fit-proportions``, ``predict``) |
"""
