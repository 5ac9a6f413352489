"""The task table of a merged multi-task dataset (Moeskops et al. §3.2).

``organmtl convert merge`` records in ``dataset.json`` which task every case belongs to and which
classes of the union label space each task owns (``organmtl_tasks``; see docs/converters.md,
"merge"). Everything of the multi-task trainers that depends on tasks (balanced sampling, per-task
output masking, the experiment runner) reads it through :class:`TaskTable`.

A dataset without ``organmtl_tasks`` is one task that owns every label, so the trainers also run on
an ordinary nnU-Net dataset.
"""
from __future__ import annotations

from dataclasses import dataclass

SINGLE_TASK = "all"


@dataclass(frozen=True)
class Task:
    """One segmentation task: its name, the merged label values it owns (background excluded), its
    training cases (``imagesTr``) and its test cases (``imagesTs``, never trained on)."""

    name: str
    label_values: tuple[int, ...]
    cases: tuple[str, ...]
    test_cases: tuple[str, ...] = ()

    @property
    def classes(self) -> tuple[int, ...]:
        """The classes a sample of this task is balanced over (§3.2): the shared background 0 and
        the task's own labels."""
        return (0, *self.label_values)


class TaskTable:
    """Tasks of a dataset and the task of each case (§3.2 "background classes ... merged into one")."""

    def __init__(self, tasks: list[Task], source: str = "dataset.json"):
        if not tasks:
            raise ValueError(f"{source}: no tasks")
        self.tasks = {t.name: t for t in tasks}
        self._task_of: dict[str, str] = {}
        for t in tasks:
            for case in t.cases + t.test_cases:
                if case in self._task_of:
                    raise ValueError(f"{source}: case {case!r} is listed under tasks {self._task_of[case]!r} "
                                     f"and {t.name!r}")
                self._task_of[case] = t.name
        self.source = source

    @classmethod
    def from_dataset_json(cls, dataset_json: dict, source: str = "dataset.json",
                          identifiers=None) -> "TaskTable":
        """Read ``organmtl_tasks`` (written by ``convert merge``). Without it: one task owning every
        label except background and ``ignore``, whose cases are ``identifiers`` (may be None)."""
        labels = dataset_json.get("labels", {})
        table = dataset_json.get("organmtl_tasks")
        if table is None:
            values = tuple(sorted(int(v) for k, v in labels.items()
                                  if k not in ("background", "ignore") and not isinstance(v, (list, tuple))))
            return cls([Task(SINGLE_TASK, values, tuple(identifiers or ()))], source)
        if not isinstance(table, dict) or not table:
            raise ValueError(f"{source}: 'organmtl_tasks' must be a non-empty mapping of task names")
        known = {int(v) for k, v in labels.items() if not isinstance(v, (list, tuple))}
        tasks = []
        for name, entry in table.items():
            try:
                values = tuple(int(v) for v in entry["label_values"])
                cases, test_cases = tuple(entry["cases"]), tuple(entry.get("test_cases", ()))
            except (KeyError, TypeError, ValueError):
                raise ValueError(f"{source}: organmtl_tasks[{name!r}] needs 'label_values' and 'cases'") from None
            unknown = sorted(set(values) - known)
            if unknown:
                raise ValueError(f"{source}: organmtl_tasks[{name!r}] owns label value(s) {unknown} "
                                 f"that 'labels' does not define")
            tasks.append(Task(name, values, cases, test_cases))
        return cls(tasks, source)

    @property
    def names(self) -> list[str]:
        return list(self.tasks)

    def task_of(self, case: str) -> str:
        """Task name of ``case``; a case of no task is an error naming it."""
        if len(self.tasks) == 1 and next(iter(self.tasks.values())).name == SINGLE_TASK:
            return SINGLE_TASK
        try:
            return self._task_of[case]
        except KeyError:
            raise KeyError(f"{self.source}: case {case!r} belongs to no task of organmtl_tasks") from None

    def task_of_prediction(self, case: str) -> str:
        """Task of a case named ``<task>_<anything>`` (how ``merge`` names cases, also test images
        that are in no table), else :meth:`task_of`."""
        if case in self._task_of or SINGLE_TASK in self.tasks:
            return self.task_of(case)
        for name in sorted(self.tasks, key=len, reverse=True):
            if case.startswith(name + "_"):
                return name
        return self.task_of(case)

    def allowed_labels(self, task: str) -> tuple[int, ...]:
        """Output classes a case of ``task`` may receive under per-task masking: background and its own."""
        return self.tasks[task].classes

    def alien_labels(self, task: str) -> tuple[int, ...]:
        """Labels of the other tasks: a voxel of a ``task`` case given one of them is a cross-task confusion."""
        own = set(self.tasks[task].label_values)
        return tuple(sorted({v for t in self.tasks.values() for v in t.label_values} - own))
