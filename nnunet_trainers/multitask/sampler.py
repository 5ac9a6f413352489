"""Mini-batches balanced over tasks and, within a task, over its classes
(Moeskops et al. §3.2: "A mini-batch contained 210 samples, equally balanced over
the tasks of the network. For each task, the training samples were randomly drawn from all training
images, balanced over the task-specific classes").

:class:`TaskBalancedDataLoader` is nnU-Net's own ``nnUNetDataLoader`` with two hooks replaced:

- ``get_indices`` picks, for every slot of the batch, a task (round robin, so every batch holds the
  tasks in equal shares; with DDP each rank starts at its own offset, so the ranks' batches are
  balanced one by one and together), a class of that task drawn uniformly from its background and
  labels, and a training case of that task in which the class occurs;
- ``get_do_oversample``/``get_bbox`` crop the patch around a voxel of the drawn class (nnU-Net's own
  foreground sampling with ``overwrite_class``: centred on it, shifted inwards at the image border)
  or, for the background class, draw nnU-Net's random crop.

Everything else (loading, cropping, padding, augmentation, multi-process workers) is nnU-Net's.
A sample of the paper is one voxel; here it is the voxel an nnU-Net patch is cropped around.
"""
from __future__ import annotations

import numpy as np

from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader

from organmtl.nnunet_trainers.multitask.tasks import TaskTable


class TaskBalancedDataLoader(nnUNetDataLoader):
    """nnU-Net data loader whose batches are balanced over tasks and over each task's classes (§3.2).

    ``task_table`` maps the loader's cases to tasks. ``rank``/``world_size``: this process' DDP rank
    and the number of ranks (each rank draws its own balanced batches); ``worker``/``num_workers``:
    the data-augmentation worker, so parallel workers do not repeat the same task order.
    """

    def __init__(self, data, batch_size, patch_size, final_patch_size, label_manager, task_table: TaskTable,
                 rank: int = 0, world_size: int = 1, num_workers: int = 1, transforms=None, **kwargs):
        super().__init__(data, batch_size, patch_size, final_patch_size, label_manager,
                         oversample_foreground_percent=0.0, transforms=transforms, **kwargs)
        self.task_table = task_table
        # nnU-Net binds its oversampling rule as an instance attribute; route it to the slot's class
        self.get_do_oversample = self.slot_wants_foreground
        self.rank, self.world_size, self.num_workers = int(rank), int(world_size), max(1, int(num_workers))
        self._batch_counter = 0
        self._slot_classes: list[int] = []
        self._current_slot = 0
        self.cases_by_task_class = self._index_cases()
        self.active_tasks = [t for t in task_table.names if self.cases_by_task_class.get(t)]
        if not self.active_tasks:
            raise ValueError(f"{task_table.source}: none of the {len(self.indices)} case(s) of this split has "
                             f"any class of any task")

    def _index_cases(self) -> dict[str, dict[int, list[str]]]:
        """``{task: {class: [cases containing it]}}`` from nnU-Net's stored class locations
        (background: every case of the task)."""
        out: dict[str, dict[int, list[str]]] = {}
        for case in self.indices:
            task = self.task_table.task_of(case)
            properties = self._data.load_case(case)[3]
            locations = properties.get("class_locations", {})
            per_class = out.setdefault(task, {})
            for c in self.task_table.tasks[task].classes:
                if c == 0 or len(locations.get(c, ())) > 0:
                    per_class.setdefault(c, []).append(case)
        return out

    def slot_tasks(self) -> list[str]:
        """Tasks of the next batch's slots: round robin over the active tasks, starting where this
        rank's (and worker's) share of the global sequence starts."""
        n = len(self.active_tasks)
        stride = self.world_size * self.num_workers
        start = ((self._batch_counter * stride) + self.thread_id * self.world_size + self.rank) * self.batch_size
        return [self.active_tasks[(start + j) % n] for j in range(self.batch_size)]

    def get_indices(self):
        """One (task, class, case) draw per slot (§3.2); returns the cases, remembers the classes."""
        keys, classes = [], []
        tasks = self.slot_tasks()
        for task in tasks:
            per_class = self.cases_by_task_class[task]
            cls = sorted(per_class)[np.random.randint(len(per_class))]
            cases = per_class[cls]
            keys.append(cases[np.random.randint(len(cases))])
            classes.append(int(cls))
        self._batch_counter += 1
        self._slot_classes = classes
        self.slot_tasks_of_last_batch = tasks
        return keys

    def slot_wants_foreground(self, sample_idx: int) -> bool:
        """Called by nnU-Net's ``generate_train_batch`` for slot ``sample_idx`` just before ``get_bbox``."""
        self._current_slot = sample_idx
        return self._slot_classes[sample_idx] != 0

    def get_bbox(self, data_shape, force_fg, class_locations, overwrite_class=None, verbose=False):
        """Crop the patch around a voxel of the slot's class (nnU-Net's foreground sampling), or a
        random crop for the background class."""
        cls = self._slot_classes[self._current_slot] if self._slot_classes else None
        if cls:
            return super().get_bbox(data_shape, True, class_locations, overwrite_class=cls, verbose=verbose)
        return super().get_bbox(data_shape, False, class_locations, verbose=verbose)
