"""The 3D recipe options: nnU-Net augmentation (augment: nnunet) and the gradual unfreeze strategy."""

from __future__ import annotations

import lightning as L
import numpy as np
import pytest
import torch

from medxfer.config import DataConfig, ModelConfig, PretrainedConfig, RunConfig, TrainConfig, parse_config
from medxfer.data.augmentations import nnunet_augmentation
from medxfer.data.base import Case
from medxfer.data.transforms import CaseDataset, training_augmentation
from medxfer.errors import ConfigError
from medxfer.finetune import run_finetune, run_id_for
from medxfer.models import build_segmenter, save_encoder

TINY = ModelConfig(preset="unet", width=4, depth=3)


def test_nnunet_augmentation_lists_nnunets_transforms_and_keeps_labels():
    names = [type(t).__name__ for t in nnunet_augmentation(3)]
    for expected in ("RandAffined", "Rand3DElasticd", "RandGaussianNoised", "RandGaussianSmoothd",
                     "RandSimulateLowResolutiond", "RandAdjustContrastd", "RandFlipd"):
        assert expected in names
    affine = nnunet_augmentation(3)[0]
    grid = affine.rand_affine.rand_affine_grid
    assert np.allclose(grid.rotate_range, [np.pi / 6] * 3) and np.allclose(grid.scale_range, [0.3] * 3)
    rng = np.random.default_rng(0)
    image = rng.normal(size=(1, 20, 20, 20)).astype(np.float32)
    label = np.zeros((20, 20, 20), np.int64)
    label[4:10, 4:10, 4:10], label[12:18, 12:18, 12:18] = 1, 2
    dataset = CaseDataset([Case(image, label, "c")], 3, transform=training_augmentation(3, [16, 16, 16], 0.5, "nnunet"))
    for _ in range(6):
        item = dataset[0]
        assert item["image"].shape == (1, 16, 16, 16) and torch.isfinite(item["image"]).all()
        assert set(item["label"].unique().tolist()) <= {0, 1, 2}  # nearest-neighbour labels: no new values
    assert parse_config({"augment": "nnunet"}, DataConfig).augment == "nnunet"
    with pytest.raises(ConfigError, match="augment"):
        parse_config({"augment": "heavy"}, DataConfig)


class EncoderWatch(L.Callback):
    def __init__(self):
        self.frozen, self.changed = [], []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self._before = pl_module.model.encoder.levels[0].block[0].weight.detach().clone()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        encoder = pl_module.model.encoder
        self.frozen.append(encoder.frozen_levels > 0)
        self.changed.append(not torch.equal(self._before, encoder.levels[0].block[0].weight))


def test_gradual_unfreeze_trains_the_encoder_only_after_k_steps(tmp_path):
    encoder_file = save_encoder(build_segmenter(TINY, in_channels=1, n_classes=2), tmp_path / "enc.pt", length=1,
                                source="test")
    config = RunConfig(model=TINY, pretrained=PretrainedConfig(checkpoint=encoder_file),
                       data=DataConfig(name="demo", options={"domain": "A"}, train_images=2, val_fraction=0.0),
                       train=TrainConfig(strategy="gradual", unfreeze_after_steps=2, max_steps=4, batch_size=2,
                                         lr=1e-2, scheduler="none"))
    watch = EncoderWatch()
    run = run_finetune(config, tmp_path / "out", callbacks=[watch])
    assert watch.frozen == [True, True, False, False]
    assert watch.changed == [False, False, True, True]
    assert run.record["strategy"] == "gradual" and run.record["freeze_encoder"] is False
    with pytest.raises(ConfigError, match="unfreeze_after_steps goes with train.strategy gradual"):
        parse_config({"train": {"strategy": "gradual"}, "pretrained": {"checkpoint": "x"}}, RunConfig)
    # an unset option keeps the ids of existing runs
    plain = RunConfig()
    assert "unfreeze_after_steps" not in str(run_id_for(plain)) and run_id_for(plain) == run_id_for(RunConfig())


def test_instance_norm_option_builds_saves_and_reloads(tmp_path):
    from medxfer.models.segmenter import model_from_checkpoint
    from medxfer.models.weights import encoder_from_checkpoint, save_model_weights

    spec = ModelConfig(preset="unet3d", width=4, depth=3, options={"norm": "instance"}, in_channels=1, n_classes=3)
    model = build_segmenter(spec)
    kinds = {type(m).__name__ for m in model.modules()}
    assert "InstanceNorm3d" in kinds and not any(k.startswith("BatchNorm") for k in kinds)
    assert model(torch.randn(1, 1, 8, 8, 8)).shape == (1, 3, 8, 8, 8)  # a batch of one is fine
    encoder = encoder_from_checkpoint(save_encoder(model, tmp_path / "enc.pt", length=0, source="test"))
    assert encoder.arch["norm"] == "instance"
    assert any(type(m).__name__ == "InstanceNorm3d" for m in encoder.modules())
    save_model_weights(model, tmp_path / "model.pt", manifest={"model": spec.model_dump()})
    again = model_from_checkpoint(tmp_path / "model.pt")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    plain = build_segmenter(ModelConfig(preset="unet3d", width=4, depth=3, in_channels=1, n_classes=3))
    assert "norm" not in plain.encoder.arch  # BatchNorm encoders keep the arch of older checkpoints
    with pytest.raises(ConfigError, match="unknown norm 'group'"):
        build_segmenter(spec.model_copy(update={"options": {"norm": "group"}}))
    with pytest.raises(ConfigError, match="unknown option"):
        build_segmenter(ModelConfig(preset="resnet18_unet", options={"norm": "instance"}, in_channels=1, n_classes=2))
