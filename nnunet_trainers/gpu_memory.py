"""Patch and batch that fit the GPU a full trainer runs on (docs/scaling.md, "GPU memory").

nnU-Net's planner sizes the 3d_fullres patch and batch for its own U-Net in about 8-11 GB of VRAM.
The paper networks of this package keep more activations per voxel (the triplanar CNN about 36 KB
per voxel in fp32: ~150 GB at 2 x 128^3), so they adjust the plan before the dataloaders are built:

1. after nnU-Net's ``initialize`` has built the network and optimizer, :func:`probe` measures one
   training step of that network (forward, backward, optimizer step) with
   :func:`organmtl.memory.measure_network_step` at a small probe patch, with batch 1 and batch 2,
   under CPU bf16 autocast for an AMP training (:data:`PROBE_AMP`; nnU-Net trains under fp16 autocast on CUDA). Memory is
   ``max(fixed + per_voxel * batch * voxels, floor)`` for these fully convolutional networks: the two
   probes' peaks up to the end of the backward pass give the first two terms (the second probe minus
   the first is one sample's activations; the forward peaks' difference when larger); ``floor`` is the probes' whole-step peak, which at a probe
   patch is often the optimizer step's (gradients + state + temporaries, the same for any batch) and
   so says nothing about the activations.
2. :func:`choose` keeps the planned patch and batch when the prediction
   (plus :data:`organmtl.memory.GPU_OVERHEAD_GIB`) fits the target; otherwise it lowers the batch
   towards 2 (nnU-Net's smallest), then shrinks the patch axis with the largest extent in mm by one
   pooling step of the plan (the U-Net's strides), never below :meth:`GPUMemoryPlanMixin.gpu_memory_min_patch`.
3. the chosen patch and batch replace the plan's in the configuration (and so in the model's
   ``plans.json``, which ``nnUNetv2_predict`` reads) together with the rule's record under
   :data:`PLANS_KEY`; the training log says what was chosen and what it predicts.

The target (``ORGANMTL_GPU_MEMORY_GB``; unset: the memory of the CUDA device the trainer runs on) and the
precision (``ORGANMTL_GPU_MEMORY_AMP``: ``fp16``, ``bf16`` or ``none``) are settings stored with the model:
a later ``--c``/``--val`` or a new fold of the same model folder reads them (and the chosen patch/batch)
back from its ``plans.json``. A new model trained off CUDA (CPU, MPS) without ``ORGANMTL_GPU_MEMORY_GB``
has no GPU to fit: it keeps nnU-Net's patch and batch and runs no probe (a full FocusNetv2 at a 3d_fullres
plan costs minutes of CPU for them); with it set, the plan is made for that many GiB wherever the trainer
runs. (:func:`organmtl.memory.default_gpu_gib`, used by ``organmtl memory-check``, gives 24 GiB without a
visible CUDA device.)
Under DDP nnU-Net splits the batch over the GPUs, so each rank holds at most the single-GPU batch.

:class:`EnvScheduleMixin` lets ``ORGANMTL_EPOCHS``/``ORGANMTL_ITERS_PER_EPOCH``/``ORGANMTL_VAL_ITERS``
shorten the schedule of a full trainer when they are set (tests, benchmarks); unset, the trainer
keeps nnU-Net's 1000 x 250 x 50. It changes no network, patch or batch.
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass

import torch

from organmtl.memory import GIB, GPU_OVERHEAD_GIB, AMP_DTYPES, default_gpu_gib, measure_network_step
from organmtl.nnunet_trainers.budget import apply_schedule, cpu_threads_from_env
from organmtl.nnunet_trainers.settings import (parse_choice, parse_float, resolve, set_plans_value, setting,
                                               stored_plans_entry, to_stored)

#: key of the rule's record inside the nnU-Net configuration of plans.json
PLANS_KEY = "organmtl_gpu_memory"
#: voxels of one probe sample at most (the probes run on the CPU at every new training)
PROBE_VOXELS = 16 * 64 * 64
MIN_BATCH = 2
#: precision of the probes per training precision: CPU autocast emulates fp16 convolutions far slower
#: than it runs bf16 (minutes per probe instead of seconds), and bf16 has fp16's 2 bytes per value,
#: so an fp16 (AMP) training is probed under bf16 autocast (``organmtl memory-check --amp fp16``
#: measures the fp16 step itself).
PROBE_AMP = {"fp16": "bf16", "bf16": "bf16", "none": "none"}


def _parse_amp(name: str, raw: str) -> str:
    return parse_choice(name, raw, sorted(AMP_DTYPES))


@dataclass(frozen=True)
class GPUMemoryOptions:
    """The GPU the plan must fit: memory in GiB and the precision of training."""

    gpu_memory_gib: float | None = setting(None, "ORGANMTL_GPU_MEMORY_GB", lambda n, v: parse_float(n, v, minimum=1.0),
                                           float, "GPU memory the training must fit, GiB (unset: the CUDA "
                                           "device's own memory, 24 without CUDA)")
    amp: str = setting("fp16", "ORGANMTL_GPU_MEMORY_AMP", _parse_amp, str,
                       "precision of the GPU training (nnU-Net: fp16 autocast)")


@dataclass(frozen=True)
class MemoryModel:
    """``max(fixed_bytes + per_voxel_bytes * batch * voxels, floor_bytes)``, measured by :func:`probe`."""

    fixed_bytes: float
    per_voxel_bytes: float
    probe_patch: tuple[int, ...]
    amp: str
    floor_bytes: float = 0.0

    def predicted_gib(self, patch, batch: int) -> float:
        grows = self.fixed_bytes + self.per_voxel_bytes * batch * math.prod(patch)
        return max(grows, self.floor_bytes) / GIB + GPU_OVERHEAD_GIB


def pooling_steps(configuration_manager) -> tuple[int, ...]:
    """Per axis, the product of the plan's U-Net strides: patch edges stay multiples of it."""
    ndim = len(configuration_manager.patch_size)
    strides = (configuration_manager.network_arch_init_kwargs or {}).get("strides")
    if not strides:
        return (1,) * ndim
    steps = [1] * ndim
    for s in strides:
        s = [s] * ndim if isinstance(s, int) else s
        steps = [a * int(b) for a, b in zip(steps, s)]
    return tuple(steps)


def probe_patch(patch, steps) -> tuple[int, ...]:
    """The planned patch shrunk (same proportions, multiples of ``steps``, at least one step) to
    about :data:`PROBE_VOXELS` voxels; the probe only measures, so the network's minimum patch does
    not apply (the networks are fully convolutional)."""
    patch = [int(p) for p in patch]
    scale = min(1.0, (PROBE_VOXELS / math.prod(patch)) ** (1.0 / len(patch)))
    return tuple(min(p, max(s, int(round(p * scale / s)) * s)) for p, s in zip(patch, steps))


def cpu_network(network: torch.nn.Module, force: bool = False) -> torch.nn.Module:
    """``network`` itself when its parameters and buffers are on the CPU (and not ``force``), else a CPU copy
    made without a second copy on the GPU (``deepcopy`` with every parameter and buffer pre-mapped to its CPU
    clone): the probes count CPU tensor storage, and a CUDA trainer's network lives on the GPU."""
    tensors = [*network.parameters(), *network.buffers()]
    if not force and all(t.device.type == "cpu" for t in tensors):
        return network
    memo = {}
    for p in network.parameters():
        memo[id(p)] = torch.nn.Parameter(p.detach().to("cpu", copy=True), requires_grad=p.requires_grad)
    for b in network.buffers():
        memo[id(b)] = b.detach().to("cpu", copy=True)
    return copy.deepcopy(network, memo)


def probe(network: torch.nn.Module, num_input_channels: int, patch, optimizer: torch.optim.Optimizer,
          amp: str) -> MemoryModel:
    """Two measured steps of ``network`` (batch 1 and 2 at ``patch``, on the CPU: :func:`cpu_network`)
    -> :class:`MemoryModel`."""
    network = cpu_network(network)

    def factory(params):
        return type(optimizer)(params, **optimizer.defaults)
    one = measure_network_step(network, (1, num_input_channels, *patch), factory, amp=amp)
    two = measure_network_step(network, (2, num_input_channels, *patch), factory, amp=amp)
    grow_one, grow_two = (m.resident_bytes + m.backward_peak_bytes for m in (one, two))
    # the forward peak's growth is one sample's saved activations even where, at the probe patch, the
    # gradients arriving during the backward pass set the backward peak (bf16: activations halve, gradients do not)
    per_sample = max(0, grow_two - grow_one, two.forward_peak_bytes - one.forward_peak_bytes)
    per_voxel = per_sample / math.prod(patch)
    return MemoryModel(float(grow_one - per_sample), float(per_voxel), tuple(int(p) for p in patch), amp,
                       float(max(one.peak_bytes, two.peak_bytes)))


def choose(model: MemoryModel, patch, batch: int, spacing, steps, minimum, target_gib: float):
    """Largest batch (down to 2), then patch, that :class:`MemoryModel` predicts to fit ``target_gib``.
    Returns ``(patch, batch)``; raises ``ValueError`` when even the smallest patch does not fit."""
    patch, batch = [int(p) for p in patch], int(batch)
    while model.predicted_gib(patch, batch) > target_gib:
        if batch > MIN_BATCH:
            batch -= 1
            continue
        axes = [a for a in range(len(patch)) if patch[a] - steps[a] >= max(minimum[a], steps[a])]
        if not axes:
            raise ValueError(f"no patch of at least {list(minimum)} voxels with batch {batch} fits {target_gib:g} GiB "
                             f"(predicted {model.predicted_gib(patch, batch):.1f} GiB at {patch}); "
                             f"raise ORGANMTL_GPU_MEMORY_GB or train on a larger GPU")
        a = max(axes, key=lambda i: patch[i] * float(spacing[i]))
        patch[a] -= steps[a]
    return tuple(patch), batch


class EnvScheduleMixin:
    """Full trainers: ``ORGANMTL_EPOCHS``/``ORGANMTL_ITERS_PER_EPOCH``/``ORGANMTL_VAL_ITERS`` shorten the
    schedule only when set (``_Tiny`` trainers apply their defaults on top, see budget.py); on a CPU,
    ``ORGANMTL_CPU_THREADS`` sets torch's threads when set."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):
        cpu_threads_from_env(device)
        super().__init__(plans, configuration, fold, dataset_json, device)
        apply_schedule(self)


class GPUMemoryPlanMixin(EnvScheduleMixin):
    """Put between the family's trainer and ``nnUNetTrainer`` in the bases (see the module doc)."""

    def gpu_memory_min_patch(self) -> tuple[int, ...]:
        """Smallest patch edges the network allows (default: one pooling step per axis)."""
        return pooling_steps(self.configuration_manager)

    def initialize(self):
        first = not self.was_initialized
        super().initialize()
        if first:
            self.plan_for_gpu_memory()

    def _unwrapped_network(self) -> torch.nn.Module:
        net = self.network.module if hasattr(self.network, "module") else self.network
        return getattr(net, "_orig_mod", net)

    def plan_for_gpu_memory(self) -> dict | None:
        """Measure, choose and store the patch/batch for the target GPU (module doc); returns the record
        (None: a new model trained off CUDA without ``ORGANMTL_GPU_MEMORY_GB``, which keeps the plan's)."""
        cm = self.configuration_manager
        stored, source = stored_plans_entry(self, PLANS_KEY)
        if stored:
            resolved = resolve(GPUMemoryOptions, stored.get("options"), source)
            for note in resolved.notes:
                self.print_to_log_file(f"GPU memory setting {note}")
            record = dict(stored)
            patch, batch = tuple(record["patch_size"]), int(record["batch_size"])
        else:
            opts = resolve(GPUMemoryOptions).options
            if opts.gpu_memory_gib is None and self.device.type != "cuda":
                self.print_to_log_file(
                    f"GPU memory plan: none (training on {self.device.type}: no GPU to fit; the plan's patch and batch "
                    f"are kept; ORGANMTL_GPU_MEMORY_GB=N plans for an N GiB GPU)")
                return None
            if opts.gpu_memory_gib is None:
                gib, where = default_gpu_gib(self.device)
                opts = dataclasses.replace(opts, gpu_memory_gib=gib)
                self.print_to_log_file(f"GPU memory target {gib:g} GiB: {where} (ORGANMTL_GPU_MEMORY_GB overrides)")
            planned_patch, planned_batch = tuple(int(p) for p in cm.patch_size), int(cm.batch_size)
            steps, minimum = pooling_steps(cm), self.gpu_memory_min_patch()
            small = probe_patch(planned_patch, steps)
            model = probe(self._unwrapped_network(), self.num_input_channels, small, self.optimizer, PROBE_AMP[opts.amp])
            patch, batch = choose(model, planned_patch, planned_batch, cm.spacing, steps, minimum, opts.gpu_memory_gib)
            record = {"options": to_stored(opts), "planned_patch_size": list(planned_patch),
                      "planned_batch_size": planned_batch, "patch_size": list(patch), "batch_size": batch,
                      "planned_predicted_gib": round(model.predicted_gib(planned_patch, planned_batch), 3),
                      "predicted_gib": round(model.predicted_gib(patch, batch), 3),
                      "probe_patch_size": list(small), "fixed_bytes": model.fixed_bytes,
                      "per_voxel_bytes": model.per_voxel_bytes, "floor_bytes": model.floor_bytes,
                      "rule": "max(fixed + per_voxel * batch * voxels, floor) from two CPU probes (batch 1, 2; "
                              "backward peaks, floor: whole-step peak; bf16 autocast for amp); "
                              "batch down to 2, then the longest patch axis (mm) by one pooling step"}
        changed = tuple(int(p) for p in cm.patch_size) != tuple(patch) or int(cm.batch_size) != batch
        set_plans_value(self, "patch_size", list(patch))
        set_plans_value(self, "batch_size", batch)
        set_plans_value(self, PLANS_KEY, record)
        if changed:
            self._set_batch_size_and_oversample()
            self._check_network_unchanged()
        o = record["options"]
        self.print_to_log_file(
            f"GPU memory plan ({'stored with the model: ' + source if stored else 'measured'}): target "
            f"{o['gpu_memory_gib']:g} GiB, amp {o['amp']} (probed {PROBE_AMP[o['amp']]}): patch {list(patch)} x batch {batch}, predicted "
            f"{record['predicted_gib']:.2f} GiB (nnU-Net's plan {record['planned_patch_size']} x batch "
            f"{record['planned_batch_size']}: {record['planned_predicted_gib']:.2f} GiB)")
        return record

    def _check_network_unchanged(self) -> None:
        """The predictor builds the network from the stored (new) patch: it must be this one."""
        rebuilt = self.build_network_architecture(self.plans_manager, self.configuration_manager,
                                                  self.num_input_channels, self.label_manager.num_segmentation_heads,
                                                  self.enable_deep_supervision)
        mine = {k: tuple(v.shape) for k, v in self._unwrapped_network().state_dict().items()}
        theirs = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
        if mine != theirs:
            raise ValueError(f"{type(self).__name__}: the network built for the chosen patch {self.configuration_manager.patch_size} "
                             f"differs from the planned one; raise gpu_memory_min_patch()")
