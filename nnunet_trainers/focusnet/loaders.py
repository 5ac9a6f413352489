"""FocusNet trainers: which patches each phase trains on (docs/focusnetv2.md "Sampling"); a mixin of
:class:`~.trainer.FocusNetTrainerBase`.

``snet``/``sol``: nnU-Net's sampler. ``ae``: :class:`~.sampler.WholeSmallOrganDataLoader` (every small organ of
the case whole in the patch). ``sos``/``joint``: the same, with :data:`NEGATIVE_FRACTION` of the samples at
nnU-Net's random positions, so that SOS-Net also meets patches without its organ (negative ROIs, target
empty), as it does at inference. The loader is switched at the phase boundary (``--c`` into a later
phase builds the right one).
"""
from __future__ import annotations

from batchgenerators.dataloading.multi_threaded_augmenter import MultiThreadedAugmenter
from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from organmtl.nnunet_trainers.focusnet.sampler import WholeSmallOrganDataLoader

#: phases whose training patches hold every small organ whole (:mod:`.sampler`)
WHOLE_ORGAN_PHASES = ("ae", "sos", "joint")
#: phases that train SOS-Net
SOS_PHASES = ("sos", "joint")
#: share of the ``sos``/``joint`` samples drawn at nnU-Net's random positions (negatives for SOS-Net)
NEGATIVE_FRACTION = 1 / 3


def _finish(augmenter) -> None:
    """Stop an nnU-Net augmenter's worker processes (what ``on_train_end`` does)."""
    if isinstance(augmenter, (NonDetMultiThreadedAugmenter, MultiThreadedAugmenter)):
        augmenter._finish()



class FocusNetSamplingMixin:
    """The training loader of each phase."""

    # ------------------------------------------------------------------------------ sampling
    def _whole_organ_sampling(self, phase: str | None = None) -> bool:
        """Whether ``phase`` (default: the current one) trains on :class:`~.sampler.WholeSmallOrganDataLoader`
        patches (the phases that train SOS-Net or the autoencoder), else on nnU-Net's sampler."""
        return bool(self.focus_settings.get("use_sos")) and (phase or self.current_phase) in WHOLE_ORGAN_PHASES

    def _training_loader(self, whole_organs: bool, random_fraction: float = 0.0):
        """nnU-Net's training loader and augmenter (its transforms, workers), with the whole-small-organ
        sampler when ``whole_organs`` (a ``random_fraction`` of its samples at nnU-Net's random positions:
        the negatives of the ``sos``/``joint`` phases)."""
        cm, lm = self.configuration_manager, self.label_manager
        rotation, dummy_2d, initial_patch_size, mirror_axes = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = self.get_training_transforms(
            cm.patch_size, rotation, self._get_deep_supervision_scales(), mirror_axes, dummy_2d,
            use_mask_for_norm=cm.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=lm.foreground_labels, regions=None, ignore_label=lm.ignore_label)
        dataset_tr, _ = self.get_tr_and_val_datasets()
        if whole_organs:
            loader = WholeSmallOrganDataLoader(dataset_tr, self.batch_size, initial_patch_size, cm.patch_size, lm,
                                               self.focus_settings["small_labels"], transforms=transforms,
                                               random_fraction=random_fraction)
            note = (f"; small organs larger than the patch in {len(loader.cases_not_fitting)} case(s), centred instead: "
                    f"{loader.cases_not_fitting[:5]}" if loader.cases_not_fitting else "")
            self.print_to_log_file(f"FocusNet: patches holding every small organ whole ({len(loader.indices)} of "
                                   f"{len(dataset_tr.identifiers)} training cases; {random_fraction:.0%} of the samples "
                                   f"at random positions instead){note}")
        else:
            loader = nnUNetDataLoader(dataset_tr, self.batch_size, initial_patch_size, cm.patch_size, lm,
                                      oversample_foreground_percent=self.oversample_foreground_percent,
                                      sampling_probabilities=None, pad_sides=None, transforms=transforms,
                                      probabilistic_oversampling=self.probabilistic_oversampling)
        workers = get_allowed_n_proc_DA()
        if workers == 0:
            gen = SingleThreadedAugmenter(loader, None)
        else:
            gen = NonDetMultiThreadedAugmenter(data_loader=loader, transform=None, num_processes=workers,
                                               num_cached=max(6, workers // 2), seeds=None,
                                               pin_memory=self.device.type == "cuda", wait_time=0.002)
        _ = next(gen)
        return gen

    def _sampling(self, phase: str | None = None) -> tuple[bool, float]:
        """``(whole organs, random fraction)`` of ``phase`` (default: the current one)."""
        phase = phase or self.current_phase
        whole = self._whole_organ_sampling(phase)
        return whole, (NEGATIVE_FRACTION if whole and phase in SOS_PHASES else 0.0)

    def get_dataloaders(self):
        """nnU-Net's loaders; in the ``ae``/``sos``/``joint`` phases the training batches come from the
        whole-small-organ sampler (validation stays nnU-Net's)."""
        train, val = super().get_dataloaders()
        self._loader_kind = (False, 0.0)
        if self._whole_organ_sampling():
            _finish(train)
            self._loader_kind = self._sampling()
            train = self._training_loader(*self._loader_kind)
        return train, val

    def _switch_sampler(self) -> None:
        """At a phase start: rebuild the training loader when the phase samples differently."""
        want = self._sampling()
        if self.dataloader_train is None or want == getattr(self, "_loader_kind", (False, 0.0)):
            return
        _finish(self.dataloader_train)
        self.dataloader_train, self._loader_kind = self._training_loader(*want), want

