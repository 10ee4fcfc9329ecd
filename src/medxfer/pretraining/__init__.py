"""Pretraining with a checkpoint schedule: encoder weights saved at several pretraining lengths.

Two tasks (``PretrainConfig.task``), each set up by its own module (``classification.py``,
``segmentation.py``):

- ``classification``: the encoder of ``model.preset`` + a pooled linear head
  (:func:`medxfer.models.build_classifier`) trained on the embedded natural-image stand-in
  (``classification.source: natural``, offline) or an ImageNet copy stored as ``.npy`` files
  (``source: imagenet``, see :mod:`medxfer.data.imagenet`). The validation accuracy of the current
  weights is recorded in every checkpoint.
- ``segmentation``: the whole ``model.preset`` (2D or 3D U-Net family) trained on any medxfer dataset
  (``data``: MSD layout, folders, demo, ...) whose cases may each annotate only some classes
  (``Case.annotated``, filled by the loaders). The default loss ``partial_dice_ce`` is the marginal loss
  of :mod:`medxfer.training.losses`: in a case, the unannotated classes are merged into background, so
  a missing annotation is never counted as background. The validation Dice counts, in each case, only
  the classes that case annotates.

Schemes (``scheme``, ``recipes.py``; every value can be overridden in ``train``; ``None`` there = the scheme's value):

==================  ===============================  ==========================================
                    simple                           advanced
==================  ===============================  ==========================================
optimizer, lr       SGD (momentum 0.9), 0.05         AdamW, 0.002
weight decay        0                                0.05 (conv/linear weights only)
schedule            cosine to 0, no warm-up          linear warm-up (5% of steps), cosine to 0
label smoothing     0                                0.1
augmentation        horizontal flip + random crop    RandomResizedCrop (area 0.25-1) + flip +
                    of the image padded by 1/8       TrivialAugmentWide + ColorJitter 0.4
==================  ===============================  ==========================================

``train.scheduler: step`` gives x0.1 at 50% and 75% of the steps; ``train.optimizer: adam`` plain Adam.
For segmentation the scheme sets the optimizer and schedule only (augmentation comes from ``data``).

Checkpoint schedule (``schedule: {unit: epoch|step, lengths: [0, 1, 2, 5]}``): after exactly
``length`` epochs (at the end of the epoch) or optimizer steps, the :class:`ScheduledCheckpoints`
callback (``schedule.py``) saves the encoder with :func:`medxfer.models.weights.save_encoder`; length 0 is the random
initialisation, saved before the first step. Training runs to the largest length; the learning-rate
schedule spans the whole run, so a checkpoint of length 2 in a [0, 2, 5] run is "2 epochs into a
5-epoch run", not a finished 2-epoch run.

Output folder (``checkpoints.py``)::

    OUT/checkpoints/encoder_lenNNNN.pt + .json   one encoder checkpoint + manifest per length
                                                 (``weights.list_checkpoints`` reads this folder)
    OUT/models/model_lenNNNN.pt + .json          segmentation only: the whole segmenter per length
    OUT/lightning/last.ckpt                      Lightning's resume checkpoint (removed when done)
    OUT/final_state.ckpt                         the trained state at the end (weights, optimizer, LR schedule,
                                                 counters): what an extension resumes from
    OUT/pretrain_config.json                     the resolved config; another config in OUT is an error
    OUT/pretrain.json                            the run record, written last: the run is done when it exists
    OUT/pretrain_lenNNNN.json                    the record of a ladder that was later extended

Extension: a finished run takes later lengths. Run it again with the same config and more lengths in
``schedule.lengths`` (all of the old ones, the new ones beyond the old longest): it resumes from
``final_state.ckpt`` (optimizer state and step counters included) and trains on to the new longest; the
learning-rate schedule is recomputed over the new longest length, so under a cosine schedule the rate rises
again at the old end (the new checkpoints are "an extended run", not what a run planned to that length from
the start would give). Lengths inside the finished schedule, an unfinished or stopped run, or another
change of the config are refused with one line. ``pretrained: {checkpoint: RUN, length: N, load: full}``
(segmentation) starts a new run from another run's whole model, with its optimizer state when ``N`` is the
length that run ended at.

Manifest fields beside save_encoder's own (arch, channels, strides, length, source, ...):
``pretraining_length``, ``length_unit``, ``val_accuracy`` (classification; ``None`` for segmentation),
``val_dice`` (segmentation), ``val_loss``, ``train_loss``, ``epoch``, ``step``, ``scheme``, ``task``,
``architecture`` (the model preset), ``dataset``, ``seed``, ``run_name``, ``config_hash``, and whatever
the checkpoint hooks return.

Resume: an interrupted run (same config, same ``OUT``) resumes from ``OUT/lightning/last.ckpt``,
saved at every epoch end (unit ``epoch``) or every ``train.resume_every_n_steps`` steps (unit
``step``). The schedule stays exact: a length whose checkpoint already exists is never rewritten
(nor are its hooks called again), and a length passed again after resuming is saved if it is missing.

Checkpoint hooks (the online slot for the transferability score, ``online.py``): a hook is a callable
``on_checkpoint(length: int, encoder: Encoder, manifest: dict) -> dict | None``, called at every
scheduled length, after the validation score and before the files are written, with the encoder in
eval mode (restored afterwards; a hook must not change the weights). Hooks are the ``hooks=`` argument
of :func:`run_pretraining`, plus every object in ``callbacks=`` that has an ``on_checkpoint`` method
(so one Lightning Callback can be both). A returned dict is merged into the manifest (JSON-able
values; names of existing manifest fields are refused) and into the run record; the key ``"stop":
True`` is consumed and ends pretraining after this checkpoint (``stop_requested`` is recorded). A hook
that is a Lightning Callback may also set ``trainer.should_stop`` itself.
"""

from __future__ import annotations

import importlib
from typing import Any

# Names are imported lazily: the sweep grid reads ``recipes`` and ``checkpoints`` without Lightning.
_EXPORTS = {
    "run_pretraining": "medxfer.pretraining.run",
    "prepare_pretraining": "medxfer.pretraining.run",
    "PretrainResult": "medxfer.pretraining.run",
    "SCHEMES": "medxfer.pretraining.recipes",
    "resolve_recipe": "medxfer.pretraining.recipes",
    "config_identity": "medxfer.pretraining.recipes",
    "ScheduledCheckpoints": "medxfer.pretraining.schedule",
    "CHECKPOINT_DIR": "medxfer.pretraining.checkpoints",
    "MODEL_DIR": "medxfer.pretraining.checkpoints",
    "RECORD_FILE": "medxfer.pretraining.checkpoints",
    "CheckpointInfo": "medxfer.pretraining.checkpoints",
    "read_checkpoints": "medxfer.pretraining.checkpoints",
    "resolve_model_checkpoint": "medxfer.pretraining.checkpoints",
    "sparse_dice": "medxfer.pretraining.segmentation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'medxfer.pretraining' has no attribute {name!r}")
