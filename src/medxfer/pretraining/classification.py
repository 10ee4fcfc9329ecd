"""Classification pretraining set-up: the preset's encoder + a pooled linear head on natural images."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader

from medxfer.config import PretrainConfig
from medxfer.data.imagenet import AugmentationRecipe, load_fashion_mnist, load_imagenet, load_natural
from medxfer.errors import ConfigError
from medxfer.models import build_classifier, build_segmenter
from medxfer.pretraining.recipes import PretrainSetup, steps_per_epoch, total_steps
from medxfer.training.tasks import ClassificationTask

def classification_setup(config: PretrainConfig, recipe: dict[str, Any], data=None) -> PretrainSetup:


    c = config.classification
    augmentation = AugmentationRecipe(kind=recipe["augmentation"], crop_scale=tuple(recipe["crop_scale"]),
                                      color_jitter=float(recipe["color_jitter"]),
                                      auto_augment=recipe["auto_augment"])
    if data is None:
        if c.source == "imagenet":
            if c.root is None:
                raise ConfigError("classification.root: required for source 'imagenet' (the folder with labels.json)")
            data = load_imagenet(c.root, input_size=c.input_size, recipe=augmentation, labels_file=c.labels_file,
                                 n_classes=c.n_classes, train_images=c.train_images, val_images=c.val_images,
                                 seed=config.subset_seed)
        elif c.source == "fashion-mnist":
            data = load_fashion_mnist(c.root, input_size=c.input_size, recipe=augmentation,
                                      train_images=c.train_images, val_images=c.val_images, seed=config.subset_seed)
        else:
            data = load_natural(input_size=c.input_size, recipe=augmentation, n_per_class=c.n_per_class,
                                val_per_class=c.val_per_class, image_size=c.image_size, data_seed=c.data_seed)
    if config.model.in_channels not in (None, data.in_channels):
        raise ConfigError(f"model.in_channels={config.model.in_channels} but the {data.name} images have "
                          f"{data.in_channels} channels")
    # The preset's own encoder, so that the checkpoints fit the downstream model exactly.
    spec = config.model.model_copy(update={"in_channels": data.in_channels, "n_classes": 2})
    encoder = build_segmenter(spec).encoder
    if encoder.spatial_dims != 2:
        raise ConfigError(f"model.preset {config.model.preset!r} is 3D; classification pretraining needs a 2D preset")
    classifier = build_classifier(encoder, data.n_classes)

    t = config.train
    generator = torch.Generator().manual_seed(config.seed)
    batch_size = min(t.batch_size, len(data.train))
    train_loader = DataLoader(data.train, batch_size=batch_size, shuffle=True, drop_last=len(data.train) > batch_size,
                              num_workers=t.num_workers, generator=generator,
                              persistent_workers=t.num_workers > 0)
    val_loader = DataLoader(data.val, batch_size=max(t.batch_size, 64), shuffle=False, num_workers=t.num_workers)
    total = total_steps(config, steps_per_epoch(train_loader))
    module = ClassificationTask(
        classifier, optimizer=recipe["optimizer"], lr=recipe["lr"], momentum=recipe["momentum"],
        weight_decay=recipe["weight_decay"], scheduler=recipe["scheduler"],
        warmup_steps=int(round(recipe["warmup_fraction"] * total)), total_steps=total,
        label_smoothing=recipe["label_smoothing"],
    )

    def score(pl_module) -> dict[str, Any]:
        result = pl_module.evaluate(val_loader)
        return {"val_accuracy": result["accuracy"], "val_loss": result["loss"]}

    return PretrainSetup(module, train_loader, val_loader, score, data.name, len(data.train), len(data.val), False,
                  {"n_classes": data.n_classes, "class_names": data.class_names})

