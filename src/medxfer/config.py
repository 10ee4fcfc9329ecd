"""Pydantic models for every config section, and YAML loading with one-line errors.

Every model forbids unknown keys, so a typo is an error that names the file and the key path
(``train.lerning_rate``), never a silently ignored setting.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator,
                      model_validator)

from medxfer.errors import ConfigError


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """Strict numbers: pydantic reads ``lr: yes`` (YAML's true) as 1.0, so a boolean is refused wherever
        the field takes no boolean. Numbers stay lax otherwise: YAML reads ``1e-3`` as a string."""
        if _contains_bool(value) and not _accepts_bool(cls.model_fields[info.field_name].annotation):
            raise ValueError(f"a boolean where a number or text belongs ({value!r}; YAML reads yes/no/on/off "
                             "as booleans)")
        return value


def _contains_bool(value: Any) -> bool:
    if isinstance(value, bool):
        return True
    return isinstance(value, (list, tuple)) and any(_contains_bool(v) for v in value)


def _accepts_bool(annotation: Any) -> bool:
    """Whether a field's type takes a boolean anywhere (``bool``, ``Any``, a model, ``list[bool]``...)."""
    if annotation is bool or annotation is Any or isinstance(annotation, TypeVar):
        return True
    if isinstance(annotation, type):
        return issubclass(annotation, BaseModel)
    args = get_args(annotation)
    if get_origin(annotation) is Literal:
        return any(isinstance(a, bool) for a in args)
    return any(_accepts_bool(a) for a in args if not isinstance(a, (str, int, float)) or isinstance(a, type))


DatasetName = Literal["demo", "colin27", "acdc", "covidqu", "idrid", "folders", "msd"]
Normalization = Literal["zscore", "minmax", "percentile", "none"]

# Bounds that keep a typo from reaching the libraries as an overflow or an allocation of terabytes.
SEED_MAX = 2**32 - 1  # NumPy's seeds are 32-bit
MAX_SIDE = 8192  # pixels/voxels along one axis of a resize or patch (IDRiD, the largest layout, is 2848 x 4288)
MAX_WIDTH = 1024  # channels of a model's first level (the presets use 16..64)
MAX_CLASSES = 255  # label maps hold class indices below 255, the ignore index
MAX_IN_CHANNELS = 256  # image channels (modalities, colours; MSD's most is 4)
Seed = Annotated[int, Field(ge=0, le=SEED_MAX)]
Side = Annotated[int, Field(ge=1, le=MAX_SIDE)]
# Lightning's names (https://lightning.ai/docs/pytorch/stable/common/trainer.html), plus our "auto"
PRECISIONS = ("auto", "64", "32", "16", "bf16", "64-true", "32-true", "16-true", "bf16-true", "16-mixed",
              "bf16-mixed", "transformer-engine", "transformer-engine-float16")
ACCELERATORS = ("auto", "cpu", "gpu", "cuda", "mps", "tpu", "hpu")


def _check_precision(value: Any) -> str:
    value = str(value)  # YAML reads `precision: 16` as a number
    if value not in PRECISIONS:
        raise ValueError(f"unknown precision {value!r}; one of {', '.join(PRECISIONS)}")
    return value


def _check_accelerator(value: str) -> str:
    if value not in ACCELERATORS:
        raise ValueError(f"unknown accelerator {value!r}; one of {', '.join(ACCELERATORS)}")
    return value


def _check_max_steps(value: int) -> int:
    if value == 0 or value < -1:
        raise ValueError(f"max_steps must be -1 (use max_epochs) or >= 1, got {value}")
    return value


class PreprocessConfig(StrictModel):
    """nnU-Net-style plan and preprocess of a 3D dataset into an on-disk cache (``medxfer.data.preprocess``)."""

    target_spacing: Optional[list[float]] = Field(
        None, description="Voxel spacing (mm per spatial axis, D H W) every case is resampled to; None = the "
        "dataset's median spacing with nnU-Net's rule for an anisotropic axis.")
    normalization: Literal["auto", "ct", "zscore", "none"] = Field(
        "auto", description="Intensity normalisation per channel: ct = clip to the dataset's foreground 0.5/99.5 "
        "percentiles, then z-score with its foreground mean and s.d.; zscore = per image (MRI); auto = ct for "
        "channels dataset.json names CT, zscore for the others.")
    image_dtype: Literal["float32", "float16"] = Field(
        "float32", description="How cached images are stored (float16 halves the disk space and the reads).")
    cache_dir: Optional[Path] = Field(
        None, exclude=True, description="Folder of the preprocessed cache (one sub-folder per plan); None = "
        "$MEDXFER_CACHE/preprocessed, else ~/.cache/medxfer/preprocessed. Not part of run ids.")

    @field_validator("target_spacing")
    @classmethod
    def _positive_spacing(cls, value: Optional[list[float]]) -> Optional[list[float]]:
        if value is not None and (len(value) != 3 or any(not 0 < v < 1e4 for v in value)):
            raise ValueError(f"target_spacing must be 3 positive spacings in mm (D H W), got {value}")
        return value


class DataConfig(StrictModel):
    """Which dataset, which part of it, and how images are prepared."""

    name: DatasetName = Field("demo", description="Dataset layout (its loader); see the dataset layouts page.")
    root: Optional[Path] = Field(None, description='Dataset folder as distributed; not used by "demo". '
                                 "Relative to the config file.")
    # A name changes no result, so it is left out of run ids (exclude).
    label: Optional[str] = Field(None, exclude=True, description=(
        "The dataset's name in records, tables and reports; a sweep sets it to the grid's key for the dataset. "
        "None = the loader's name where it says more than the layout (demo-nuclei-B, covidqu-infection), "
        "else the root folder's name. Not part of the run id."))
    options: dict[str, Any] = Field(default_factory=dict, description=(
        'Dataset-specific choices: demo {"domain": "A"|"B"}; colin27 {"domain": "t1"|"t2like"}; '
        'covidqu {"masks": "infection"|"lung"}; idrid {"lesions": [...]}; acdc {"frames": ["ED", "ES"]}; '
        'msd {"task": ...}; folders {"n_classes": n, "class_names": [...], "test_fraction": f, "spacing": mm or '
        '[row mm, column mm]} (spacing: the pixel size, so HD95/HD/ASSD and the NSD tolerance are in mm; default '
        'unknown = pixels). Each loader checks its own.'))
    spatial_dims: Literal[2, 3] = Field(2, description="2D or 3D images.")
    train_images: Optional[Union[int, float]] = Field(None, description=(
        "Training images used: n images (int) or a fraction of the pool (float); None = all."))
    subset: Literal["random", "first"] = Field("random", description=(
        "How the training subset is chosen: random (seeded, nested across sizes) or the first n."))
    val_fraction: Optional[float] = Field(None, ge=0.0, lt=1.0, description=(
        "Share of the labelled training pool held out for validation; None = the dataset's own split "
        "(its official validation set where it has one, else 0.2)."))
    resize: Optional[list[Side]] = Field(None, description=(
        "Resize whole images to this size, one size per spatial axis (e.g. [512, 512] for IDRiD); None = keep."))
    normalization: Normalization = Field("zscore", description="Intensity normalisation of each image.")
    percentile_clip: tuple[float, float] = Field((0.5, 99.5), description=(
        'Low and high percentiles, 0 <= low < high <= 100, for normalization "percentile".'))
    patch_size: Optional[list[Side]] = Field(None, description=(
        "Train on random patches of this size (and predict by sliding window); None = whole images."))
    foreground_ratio: float = Field(0.5, ge=0.0, le=1.0, description="Share of patches centred on foreground.")
    augment: Union[bool, Literal["nnunet"]] = Field(False, description=(
        "Random training augmentation. Off by default: at the few-image recipe's fixed step budget it lowered "
        "Dice on 5 of 6 seeds (the docs' finetune page, the few-image recipe); turn it on for long training. "
        "true = flips, quarter turns and intensity "
        "scale/shift; nnunet = "
        "nnU-Net's set (rotation, scaling, elastic, noise, blur, brightness, contrast, low-resolution "
        "simulation, gamma, mirroring; the docs' finetune page lists ranges and probabilities), applied to "
        "each sampled patch; false = none."))
    preprocess: Optional[PreprocessConfig] = Field(None, description=(
        "Plan and preprocess the dataset once into an on-disk cache (msd layout, 3D): resampling to a target "
        "spacing, dataset-level CT normalisation; training then reads patches from the cache. None = read the "
        "files and normalise per image (normalization)."))

    @field_validator("percentile_clip")
    @classmethod
    def _percentiles_in_range(cls, value: tuple[float, float]) -> tuple[float, float]:
        lo, hi = value
        if not 0.0 <= lo < hi <= 100.0:
            raise ValueError(f"percentiles must satisfy 0 <= low < high <= 100, got [{lo:g}, {hi:g}]")
        return value

    @model_validator(mode="after")
    def _sizes_match_dims(self) -> "DataConfig":
        for key in ("patch_size", "resize"):
            size = getattr(self, key)
            if size is not None and len(size) != self.spatial_dims:
                raise ValueError(f"{key} {size} has {len(size)} sizes for {self.spatial_dims}D data "
                                 f"(spatial_dims: {self.spatial_dims})")
        return self


class ModelConfig(StrictModel):
    """A segmentation model preset (see ``medxfer models``) and its size."""

    preset: str = Field("unet", description="Model preset; `medxfer models` lists them.")
    in_channels: Optional[int] = Field(None, ge=1, le=MAX_IN_CHANNELS, description=(
        "Input channels (at most 256); None = from the data (or the pretrained encoder)."))
    n_classes: Optional[int] = Field(None, ge=2, le=MAX_CLASSES, description=(
        "Output classes, including background (2..255: label 255 is the ignore index); None = from the data."))
    width: int = Field(32, ge=1, le=MAX_WIDTH, description="Channels of the first level (classic U-Net encoders).")
    depth: int = Field(5, ge=2, le=6, description="Number of encoder levels.")
    options: dict[str, Any] = Field(default_factory=dict, description=(
        "Preset-specific options (`medxfer models`; an unknown one is an error naming the known ones), e.g. "
        "decoder_channels, final_channels; the classic U-Net presets (unet, unet3d, attention_*) also norm: "
        "batch (default) or instance (InstanceNorm with affine parameters in every encoder and decoder block, "
        "nnU-Net's choice for 3D batches of 2); every preset: deep_supervision: true "
        "(1x1 heads on the decoder's lower resolutions, trained with nnU-Net's weighted loss; inference uses the "
        "full-resolution output only)."))
    upsample: Literal["interpolate", "transposed"] = Field(
        "interpolate", description="How the decoder upsamples: 'interpolate' (a 1x1 convolution, then bilinear / "
        "trilinear interpolation; no checkerboard pattern) or 'transposed' (a transposed convolution with kernel = "
        "stride: the decoder of every checkpoint written before this key existed, whose manifests lack it and "
        "rebuild with it).")


class PretrainedConfig(StrictModel):
    """Where the starting weights come from (None of these = random init)."""

    checkpoint: Optional[Path] = Field(None, description=(
        "An encoder checkpoint file, a model.pt of a run, a checkpoint folder (with `length`), an imported "
        "folder (`medxfer weights import`) or a raw torchvision/timm file; None = random init. "
        "Relative to the config file."))
    length: Optional[int] = Field(None, description="Pretraining length to pick from a checkpoint folder.")
    load: Literal["encoder", "full", "encoder_decoder"] = Field("encoder", description="Which weights are loaded.")
    scheme: Optional[str] = Field(None, description=(
        'The starting point\'s name in records, tables and the report ("simple", "advanced", "imagenet", ...); '
        'it changes no training. None = the checkpoint manifest\'s pretraining scheme, else, for imported '
        'weights, their label (e.g. "ImageNet efficientnet-lite0"); the report names an arm "full (<scheme>)".'))


Strategy = Literal["scratch", "full", "frozen_encoder", "partial", "discriminative", "gradual"]


class TrainConfig(StrictModel):
    """How the model is fine-tuned: strategy, optimisation, loss, precision and device."""

    strategy: Strategy = Field("full", description=(
        "How the model is trained: scratch, full fine-tuning, frozen_encoder, partial (first levels frozen) or "
        "discriminative (smaller encoder lr) or gradual (encoder frozen for unfreeze_after_steps steps, then "
        "everything trained); all but scratch and full need pretrained.checkpoint."))
    frozen_levels: int = Field(0, ge=0, description='For "partial": the first k encoder levels are frozen.')
    unfreeze_after_steps: Optional[int] = Field(None, ge=1, description=(
        'For "gradual" (required there): optimizer steps with the encoder frozen (BatchNorm statistics '
        "included); from then on every weight is trained at the run's learning rate and schedule."))
    encoder_lr_factor: float = Field(0.1, gt=0.0, description='For "discriminative": encoder lr = lr * factor.')
    optimizer: Literal["adam", "adamw", "sgd"] = Field("adam", description="Optimizer.")
    lr: float = Field(1e-3, gt=0.0, description="Learning rate.")
    weight_decay: float = Field(0.0, ge=0.0, description="Weight decay.")
    momentum: float = Field(0.9, description="SGD momentum.")
    scheduler: Literal["none", "cosine", "step", "poly"] = Field("cosine", description=(
        "Learning-rate schedule per optimizer step: cosine (to 0 at the last step), step (x0.1 at 1/3 and 2/3), "
        "poly (nnU-Net's (1 - step / total) ** 0.9) or none."))
    nesterov: bool = Field(False, description="SGD only: Nesterov momentum (nnU-Net's recipe uses it, with momentum 0.99).")
    pretrained_encoder_lr_factor: float = Field(0.1, gt=0.0, le=1.0, description=(
        'For "full" and "partial" runs that load a pretrained encoder: the encoder trains at lr * factor, the '
        "decoder and head at lr, so that a few images do not wash out the pretrained features (measured: see the "
        "recipe page). 1 = one lr for the whole model, as before this key existed. Scratch runs always use lr "
        'alone; "discriminative" uses encoder_lr_factor.'))
    sampling: Literal["with_replacement", "epochs"] = Field("with_replacement", description=(
        "How training batches are drawn: with_replacement (every step draws batch_size images uniformly with "
        "replacement, so a step never sees a short batch; an epoch is ceil(n / batch_size) steps) or epochs "
        "(each image once per epoch, the last batch shorter: with 5 images at batch 4, every other step is a "
        "batch of one)."))
    max_epochs: int = Field(10, ge=1, description="Training length in epochs (unless max_steps is set).")
    max_steps: int = Field(-1, description="Training length in optimizer steps; > 0 overrides max_epochs, -1 = use max_epochs.")
    batch_size: int = Field(4, ge=1, description=(
        "Images (or patches) per optimizer step (4: on few images, 8 cost 1.6x the time per step for no "
        "better Dice; the docs' finetune page, the few-image recipe)."))
    early_stopping_patience: Optional[int] = Field(None, ge=1, description=(
        "Stop after this many validations without validation Dice improvement; None = never stop early."))
    val_every_n_steps: Optional[int] = Field(None, ge=1, description=(
        "Validate every N optimizer steps instead of after every epoch (few-image epochs are a step or two "
        "long, and validating that often can cost more than the training); None = every epoch."))
    plateau_steps: Optional[int] = Field(None, ge=1, description=(
        "Stop training once the validation headline has not improved by more than plateau_min_delta for this "
        "many optimizer steps (checked at each validation, so use it with val_every_n_steps; needs a "
        "validation set); max_steps / max_epochs stay the cap. None = train to the cap."))
    plateau_min_delta: float = Field(0.0, ge=0.0, description=(
        "Smallest rise of the validation headline (Dice) that counts as an improvement for plateau_steps."))
    checkpoint_every_s: Optional[float] = Field(60.0, gt=0.0, description=(
        "How often the resume checkpoint (weights + optimizer state) is written: every N seconds of training, "
        "or None = at every epoch end. Few-image epochs are short, and writing a large model's checkpoint can "
        "take longer than a training step, so the default is by time."))
    loss: str = Field("auto", description=(
        '"auto" | "dice" | "ce" | "dice_ce" | "focal" | "tversky" | "dice_focal", each also as '
        '"partial_<name>" for sparse annotations; see the losses page.'))
    loss_options: dict[str, Any] = Field(default_factory=dict, description=(
        "build_loss options, e.g. {lambda_ce: 0.5}; unused with loss auto."))
    precision: str = Field("auto", description=(
        '"auto": bf16/16 mixed precision on a GPU, fp32 on the CPU; or any Lightning value '
        "(32-true, 16-mixed, bf16-mixed, ...)."))
    num_workers: Optional[int] = Field(None, ge=0, description=(
        "Data-loader worker processes; None = auto: min(4, cores - 1) for patches read from the preprocessed "
        "cache (data.preprocess), 0 for in-memory data. Patches from the cache are the same for any worker count."))
    accelerator: str = Field("auto", description=(
        "auto | cpu | gpu | cuda | mps | tpu | hpu (a GPU one must be present at run time)."))
    log_every_n_steps: int = Field(10, ge=1, description="Logging interval in optimizer steps.")
    threads: Optional[int] = Field(None, ge=1, description=(
        "Intra-op CPU threads (torch.set_num_threads) of the run; None = OMP_NUM_THREADS when you set it, else "
        "the CPUs of the process's affinity mask divided among a local sweep's workers (at least 1). The "
        "resolved count is part of the run id: results differ slightly between thread counts (see the "
        "reproducibility section of the fine-tuning page)."))

    _max_steps = field_validator("max_steps")(_check_max_steps)
    _precision = field_validator("precision", mode="before")(_check_precision)
    _accelerator = field_validator("accelerator")(_check_accelerator)


class EvalConfig(StrictModel):
    """How the trained model is evaluated on the test split (and, optionally, on a source test set)."""

    threshold: float = Field(0.5, gt=0.0, lt=1.0, description="Binary tasks: probability threshold.")
    nsd_tolerance: float = Field(1.0, ge=0.0, description=(
        "Tolerance tau of the normalised surface Dice: mm when the data has a spacing, else pixels."))
    sw_overlap: float = Field(0.25, ge=0.0, lt=1.0, description="Sliding-window overlap (patch-trained models).")
    sw_batch_size: int = Field(4, ge=1, description="Windows per forward pass in sliding-window inference.")
    max_overlays: int = Field(4, ge=0, description=(
        "At most this many test cases in the overlay grid of `medxfer report` (image, ground truth and each "
        "shown run's prediction; the smallest value among the runs shown, and at most the report's 3); 0 = no "
        "overlay grid. `medxfer predict` writes an overlay per input regardless."))
    source_test: Optional[DataConfig] = Field(None, description=(
        "A data section: also evaluate here (forgetting of the source task)."))
    headline: Literal["pooled", "per_image"] = Field(
        "pooled", description="The headline Dice, used for model selection on the validation set and "
        "reported first: 'pooled' = per foreground class 2*sum(tp) / (2*sum(tp) + sum(fp) + sum(fn)) over "
        "all images, then the mean over classes (predicting nothing scores 0); 'per_image' = the older "
        "per-image mean over classes with a class absent from both truth and prediction scoring 1 "
        "(rewards predicting nothing when classes are often absent).")


class RunConfig(StrictModel):
    """One downstream run: data + model + starting weights + training + evaluation."""

    @property
    def subset_seed(self) -> int:
        """The seed that chooses the training subset: ``data_seed``, else ``seed``."""
        return self.seed if self.data_seed is None else self.data_seed

    name: str = Field("run", description="The run's name, for people: no part of the run id (a renamed run "
                                         "reuses its record; a sweep's run and the same `finetune` are one run).")
    seed: Seed = Field(0, description=(
        "Seeds Python, NumPy and torch (initialisation, batch order, augmentation) and, unless data_seed is "
        "set, chooses the training subset."))
    data_seed: Optional[Seed] = Field(None, description=(
        "Chooses the training subset (data.train_images) instead of seed; None = seed. Fix it and vary seed "
        "for 'same volumes, different initialisation', or vary it alone for 'different volumes'. Left out of "
        "the run id when None."))
    data: DataConfig = Field(default_factory=DataConfig, description="The target dataset.")
    model: ModelConfig = Field(default_factory=ModelConfig, description="The segmentation model.")
    pretrained: PretrainedConfig = Field(default_factory=PretrainedConfig, description="The starting weights.")
    train: TrainConfig = Field(default_factory=TrainConfig, description="Fine-tuning.")
    evaluation: EvalConfig = Field(default_factory=EvalConfig, description="Evaluation on the test split.")

    @model_validator(mode="after")
    def _strategy_needs_weights(self) -> "RunConfig":
        if (self.train.strategy == "gradual") != (self.train.unfreeze_after_steps is not None):
            raise ValueError("train.unfreeze_after_steps goes with train.strategy gradual (and gradual needs it)")
        if self.train.strategy != "scratch" and self.pretrained.checkpoint is None:
            # "full" without a checkpoint is a scratch run; say so instead of pretending.
            if self.train.strategy in ("frozen_encoder", "partial", "discriminative", "gradual"):
                raise ValueError(
                    f"train.strategy={self.train.strategy!r} needs pretrained.checkpoint"
                )
        return self


class EvaluateConfig(StrictModel):
    """``medxfer evaluate``: one trained model on one dataset, without training (e.g. the base model's own
    source Dice, its zero-shot Dice on a new domain: the forgetting baseline)."""

    name: str = Field("evaluate", description="The evaluation's name (recorded only).")
    data: DataConfig = Field(..., description=(
        "The dataset to evaluate on; its preprocessing keys (normalization, percentile_clip, patch_size) "
        "are applied as in fine-tuning, so give the ones the model was trained with."))
    split: Literal["test", "val", "train"] = Field("test", description=(
        "Which split of the dataset is evaluated; test = the split fine-tuning runs report."))
    test_set: str = Field("target", min_length=1, description=(
        'The key of the metrics in the record ("target" like a run\'s own test set, "source" like '
        "evaluation.source_test), so tables put it beside the matching fine-tuning column."))
    evaluation: EvalConfig = Field(default_factory=EvalConfig, description=(
        "Threshold, NSD tolerance and sliding-window settings (source_test is not used here)."))


# --- transferability scoring (``medxfer score``) and its validation (``medxfer analyze``) ------------

ScoreMetric = Literal["cosine", "l2", "pearson"]


class AugmentConfig(StrictModel):
    """Photometric jitter of the robustness score, applied in each normalised image's display range [0, 1].

    Factors are drawn uniformly: brightness/contrast/saturation in [1 - v, 1 + v], hue shift in [-v, v].
    Saturation and hue act on RGB (3-channel 2D) images only; ``noise`` (Gaussian std) on the others.
    """

    brightness: float = Field(0.1, ge=0.0, lt=1.0, description="Brightness factor drawn in [1 - v, 1 + v].")
    contrast: float = Field(0.05, ge=0.0, lt=1.0, description="Contrast factor drawn in [1 - v, 1 + v].")
    saturation: float = Field(0.1, ge=0.0, lt=1.0, description="Saturation factor drawn in [1 - v, 1 + v] (RGB only).")
    hue: float = Field(0.05, ge=0.0, le=0.5, description="Hue shift drawn in [-v, v] (RGB only).")
    noise: float = Field(0.02, ge=0.0, description="Gaussian noise std (images that are not RGB).")


class StopConfig(StrictModel):
    """Which score variant decides when pretraining could stop, and the rule applied to it."""

    rule: Literal["recommended", "argmin", "patience"] = Field("recommended", description=(
        '"recommended": the online rule `medxfer analyze` recommends (rule_file, else the built-in one); '
        '"argmin" / "patience": applied to the score variant below.'))
    rule_file: Optional[Path] = Field(None, description=(
        '"recommended": a recommended_rule.json written by `medxfer analyze`.'))
    patience: int = Field(2, ge=1, description='"patience": checkpoints without improvement before stopping.')
    min_delta: float = Field(0.0, ge=0.0, description="An improvement must lower the score by more than this.")
    metric: ScoreMetric = Field("cosine", description="The variant's distance metric.")
    margin: float = Field(0.5, ge=0.0, description="The variant's margin.")
    level: int = Field(-1, description="The variant's encoder level; negative counts from the deepest.")
    pooled: bool = Field(True, description="The variant's features: spatial mean (true) or flattened maps.")


class ScoreConfig(StrictModel):
    """Transferability of every checkpoint of a pretraining run on the target's training images."""

    name: str = Field("score", description="The score run's name.")
    seed: Seed = Field(0, description="Seeds the image subset, the augmentations, the negative pairing and the bootstrap.")
    data: DataConfig = Field(default_factory=DataConfig, description="The target dataset (its training split is scored).")
    checkpoints: Path = Field(description=(
        "A folder of encoder checkpoints (one per pretraining length) or one checkpoint file. Required."))
    model: Optional[ModelConfig] = Field(None, description=(
        "The architecture of a checkpoint file without a manifest (a raw torchvision/timm state dict): its "
        "preset (in_channels None = the images'); checkpoints with a manifest rebuild their own encoder."))
    out: Path = Field(Path("score_out"), description=(
        "Output folder: robustness.csv (+ baselines.csv, recommendation.json) land here."))
    n_images: Optional[int] = Field(None, ge=2, description="Training images scored; None = all.")
    crop_size: Optional[list[Side]] = Field(None, description=(
        "Centre crop / zero-pad every image to this size; None = keep."))
    metrics: list[ScoreMetric] = Field(default_factory=lambda: ["cosine", "l2", "pearson"],
                                       description="Distance metrics scored.")
    margins: list[float] = Field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0],
                                 description="Margins scored (each >= 0).")
    levels: Optional[list[int]] = Field(None, description="Encoder levels scored; None = all.")
    pooled: list[bool] = Field(default_factory=lambda: [True, False],
                               description="Features scored: spatial mean (true) and/or flattened maps (false).")
    augment: AugmentConfig = Field(default_factory=AugmentConfig, description="Photometric jitter of the score.")
    protocol: Literal["medxfer", "reference"] = Field("medxfer", description=(
        '"medxfer": per-image jitter in each image\'s own range, negatives one seeded cycle; "reference": the '
        "reference code's protocol (one ColorJitter per view, negatives i -> (N+1-i) mod N, levels 1..5)."))
    batch_size: int = Field(16, ge=1, description="Images per forward pass.")
    bootstrap: int = Field(1000, ge=0, description="Bootstrap resamples over images for the interval; 0 = none.")
    confidence: float = Field(0.95, gt=0.0, lt=1.0, description="Confidence level of the bootstrap interval.")
    device: str = Field("auto", description='"auto" = CUDA when available, else CPU.')
    encoder_name: Optional[str] = Field(None, description=(
        "The `encoder` column; None = the checkpoint's architecture name."))
    pretraining_scheme: Optional[str] = Field(None, description="The `scheme` column; None = the checkpoint manifest's scheme.")
    baselines: list[Literal["logme", "hscore", "linear_probe", "knn", "gbc", "gbc_diagonal", "ccfv", "ccfv_ratio"]] = Field(
        default_factory=list, description=(
            "Other transferability estimators, written to baselines.csv: gbc = spherical Gaussians (the authors' "
            "default), gbc_diagonal = diagonal ones; ccfv = the paper's log(F_v / C_cons), ccfv_ratio = medxfer's "
            "earlier variant (diagonal, background included, minus a ratio)."))
    baseline_pixels: int = Field(20000, ge=10, description="Pixels sampled (seeded) for LogME / H-score / kNN / GBC / CC-FV.")
    knn_k: int = Field(20, ge=1, description="Neighbours of the kNN probe.")
    probe_steps: int = Field(300, ge=1, description="Linear-probe training steps.")
    probe_level: Optional[int] = Field(None, description="Level of the probes; None = the level whose stride is closest to 4.")
    stop: StopConfig = Field(default_factory=StopConfig, description="When pretraining could stop.")

    @property
    def level_offset(self) -> int:
        """1 under the reference protocol (levels numbered 1..5 as published, in the config and the
        tables), else 0 (medxfer's encoder levels 0..n-1)."""
        return 1 if self.protocol == "reference" else 0

    def encoder_level(self, level: Optional[int]) -> Optional[int]:
        """A level as written in this config -> the encoder's level index (negative ones unchanged)."""
        return level - self.level_offset if level is not None and level > 0 else level

    @model_validator(mode="after")
    def _check_lists(self) -> "ScoreConfig":
        if not self.metrics or not self.margins or not self.pooled:
            raise ValueError("metrics, margins and pooled need at least one value each")
        if any(m < 0 for m in self.margins):
            raise ValueError("margins must be >= 0")
        return self


class NameMapConfig(StrictModel):
    """Raw name -> canonical key, per kind, for joining downstream results with scores (``analyze``)."""

    encoder: dict[str, str] = Field(default_factory=dict, description="Model or encoder name -> encoder key.")
    dataset: dict[str, str] = Field(default_factory=dict, description="Dataset name -> dataset key.")
    scheme: dict[str, str] = Field(default_factory=dict, description="Pretraining scheme name -> scheme key.")


# --------------------------------------------------------------------------------------------------
# Pretraining (``medxfer pretrain``); the schemes and their defaults are documented in medxfer.pretraining.


class ScheduleConfig(StrictModel):
    """Pretraining lengths at which checkpoints are saved; 0 = the random initialisation."""

    unit: Literal["epoch", "step"] = Field("epoch", description="Unit of the lengths.")
    lengths: list[int] = Field(default_factory=lambda: [0, 1, 2, 5], min_length=1, description=(
        "Pretraining lengths with a checkpoint (>= 0, no repeats; sorted); 0 = the random initialisation."))

    @field_validator("lengths")
    @classmethod
    def _non_negative_unique(cls, lengths: list[int]) -> list[int]:
        if any(n < 0 for n in lengths):
            raise ValueError("pretraining lengths must be >= 0")
        if len(set(lengths)) != len(lengths):
            raise ValueError("pretraining lengths must not repeat")
        return sorted(lengths)


class ClassificationDataConfig(StrictModel):
    """Images for classification pretraining: the embedded stand-in, Fashion-MNIST, or an ImageNet ``.npy`` copy."""

    source: Literal["natural", "imagenet", "fashion-mnist"] = Field("natural", description=(
        "natural: the embedded stand-in; imagenet: an ImageNet .npy copy; fashion-mnist: Debian's Fashion-MNIST."))
    root: Optional[Path] = Field(None, description=(
        "imagenet: folder with labels.json and data/<name>.npy; fashion-mnist: folder with the *-idx*-ubyte.gz "
        "files (default /usr/share/datasets/fashion-mnist, from Debian's dataset-fashion-mnist)."))
    labels_file: str = Field("labels.json", description="imagenet: the labels file, relative to root.")
    n_classes: int = Field(1000, ge=2, description="imagenet: labels.json holds 1..n_classes.")
    train_images: Optional[Union[int, float]] = Field(None, description=(
        "imagenet, fashion-mnist: seeded subset of the training split (n or fraction); None = all."))
    val_images: Optional[int] = Field(None, ge=1, description=(
        "imagenet: first n validation files by name; fashion-mnist: first n test images; None = all."))
    n_per_class: int = Field(100, ge=1, description="natural: training crops per class.")
    val_per_class: int = Field(20, ge=1, description="natural: validation crops per class.")
    image_size: int = Field(32, ge=8, le=MAX_SIDE, description="natural: side of the generated crops (pixels).")
    data_seed: Seed = Field(0, description="natural: which crops (fixed per dataset, not per run).")
    input_size: int = Field(32, ge=8, le=MAX_SIDE, description=(
        "Network input side (pixels): training crops and validation centre crops."))


class PretrainTrainConfig(StrictModel):
    """Optimisation and augmentation of pretraining; ``None`` = the scheme's default."""

    optimizer: Optional[Literal["sgd", "adam", "adamw"]] = Field(None, description="Optimizer; None = the scheme's.")
    lr: Optional[float] = Field(None, gt=0.0, description="Learning rate; None = the scheme's.")
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD momentum (sgd only).")
    weight_decay: Optional[float] = Field(None, ge=0.0, description="Weight decay; None = the scheme's.")
    scheduler: Optional[Literal["none", "step", "cosine"]] = Field(None, description=(
        "Learning-rate schedule, per optimizer step, after any warm-up; None = the scheme's."))
    warmup_fraction: Optional[float] = Field(None, ge=0.0, lt=1.0, description=(
        "Share of all steps with linear warm-up; None = the scheme's."))
    label_smoothing: Optional[float] = Field(None, ge=0.0, lt=1.0, description="Classification only; None = the scheme's.")
    crop_scale: Optional[tuple[float, float]] = Field(None, description="advanced: RandomResizedCrop area range.")
    color_jitter: Optional[float] = Field(None, ge=0.0, description="advanced: brightness/contrast/saturation jitter.")
    auto_augment: Optional[Literal["none", "trivial", "randaugment"]] = Field(None, description="advanced: automatic augmentation policy.")
    batch_size: int = Field(64, ge=1, description="Images per optimizer step.")
    loss: str = Field("partial_dice_ce", description=(
        "Segmentation only; partial_* never counts missing classes as background."))
    num_workers: int = Field(0, ge=0, description="Data-loader worker processes.")
    precision: str = Field("auto", description=(
        '"auto": bf16/16 mixed precision on a GPU, fp32 on the CPU; or any Lightning value.'))
    accelerator: str = Field("auto", description="auto | cpu | gpu | cuda | mps | tpu | hpu.")
    log_every_n_steps: int = Field(10, ge=1, description="Logging interval in optimizer steps.")
    resume_every_n_steps: int = Field(100, ge=1, description="Step schedules: Lightning resume checkpoint interval.")

    _precision = field_validator("precision", mode="before")(_check_precision)
    _accelerator = field_validator("accelerator")(_check_accelerator)


class OnlineScoreConfig(StrictModel):
    """The transferability score computed on target images at every scheduled pretraining checkpoint."""

    data: DataConfig = Field(description="The target dataset (its training split is scored). Required.")
    stop_early: bool = Field(True, description=(
        "False: log the score into the manifests only, never stop pretraining."))
    settings: dict[str, Any] = Field(default_factory=dict, description=(
        "Any other key of a score config (n_images, metrics, margins, levels, pooled, augment, stop, ...)."))


class PretrainConfig(StrictModel):
    """One pretraining run: encoder (model preset), data, scheme, checkpoint schedule."""

    @property
    def subset_seed(self) -> int:
        """The seed that chooses the training subset: ``data_seed``, else ``seed``."""
        return self.seed if self.data_seed is None else self.data_seed

    name: str = Field("pretrain", description="The pretraining run's name.")
    seed: Seed = Field(0, description=(
        "Seeds Python, NumPy and torch and, unless data_seed is set, chooses the training subset."))
    data_seed: Optional[Seed] = Field(None, description=(
        "Chooses the training subset (data.train_images; classification.train_images of imagenet and "
        "fashion-mnist) instead of seed; None = seed. Left out of the run identity when None."))
    task: Literal["classification", "segmentation"] = Field("classification", description="Pretraining task.")
    scheme: Literal["simple", "advanced"] = Field("simple", description="Pretraining recipe (defaults of the train section).")
    model: ModelConfig = Field(default_factory=ModelConfig, description=(
        "classification: the preset's encoder (+ pooled linear head); segmentation: the whole preset."))
    classification: ClassificationDataConfig = Field(default_factory=ClassificationDataConfig,
                                                     description="Classification images.")
    data: Optional[DataConfig] = Field(None, description=(
        "segmentation: any medxfer dataset (sparse labels via Case.annotated)."))
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig, description="Checkpoint schedule.")
    train: PretrainTrainConfig = Field(default_factory=PretrainTrainConfig, description="Optimisation and augmentation.")
    online_score: Optional[OnlineScoreConfig] = Field(None, description=(
        "Score each checkpoint on the target while pretraining."))
    # Left out of the run identity when None, so existing folders keep theirs.
    pretrained: Optional[PretrainedConfig] = Field(None, description=(
        "Continue pretraining from other weights; None = random init. load: encoder (default) takes an encoder "
        "(an imported ImageNet folder, a raw file, another run's checkpoint); with task segmentation, load: full "
        "takes another segmentation pretraining's whole model of `length` (checkpoint = its folder) and, when "
        "that is the length its run ended at, its optimizer state too (a continued run); encoder_decoder takes "
        "the model without its head (other classes)."))

    @model_validator(mode="after")
    def _segmentation_needs_data(self) -> "PretrainConfig":
        if self.task == "segmentation" and self.data is None:
            raise ValueError("task 'segmentation' needs a data section (the sparsely annotated dataset)")
        if self.pretrained is not None and self.pretrained.checkpoint is None:
            raise ValueError("pretrained: set checkpoint (the encoder or pretraining run to continue from)")
        if self.pretrained is not None and self.pretrained.load != "encoder" and self.task != "segmentation":
            raise ValueError(f"pretrained.load: {self.pretrained.load} continues a segmentation pretraining (whole "
                             "model); classification pretraining continues from an encoder (load: encoder)")
        return self


M = TypeVar("M", bound=BaseModel)


def _format_loc(loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(("." if parts else "") + str(item))
    return "".join(parts) or "<root>"


def validation_error_message(source: str, error: ValidationError) -> str:
    """One line: ``FILE: key.path: problem`` for the first error (and how many more there are)."""
    errors = error.errors()
    first = errors[0]
    loc = _format_loc(tuple(x for x in first["loc"] if not str(x).startswith("function-after")))
    if first["type"] == "extra_forbidden":
        problem = "unknown key"
    else:
        problem = first["msg"]
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return f"{source}: {loc}: {problem}{more}"


def parse_config(data: Any, model: type[M], source: str = "<config>") -> M:
    """Validate a mapping against ``model``; errors become one-line ``ConfigError``s."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: <root>: expected a mapping of keys, got {type(data).__name__}")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(validation_error_message(source, exc)) from None


MAX_YAML_NODES = 100_000  # a config has hundreds; an alias bomb expands to billions


class StrictSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key repeated in one mapping (PyYAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue  # "<<" merges are allowed to be overridden
                key = self.construct_scalar(key_node)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"duplicate key {key!r} (first on line {seen[key] + 1})", key_node.start_mark)
                seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _expanded_size(node: yaml.Node, sizes: dict[int, int]) -> int:
    """Node count of the document with every alias expanded (aliases share node objects: memoised by id)."""
    known = sizes.get(id(node))
    if known is not None:
        return known
    sizes[id(node)] = 1  # a recursive alias counts once instead of looping
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(child, sizes) for child in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, sizes) + _expanded_size(v, sizes) for k, v in node.value)
    else:
        size = 1
    sizes[id(node)] = size
    return size


def safe_load_yaml(stream: Any, source: str = "<yaml>") -> Any:
    """Safe YAML loading that refuses duplicate keys and documents whose aliases expand past
    ``MAX_YAML_NODES`` nodes (a "billion laughs" bomb is small on disk and unbounded once expanded).
    Invalid YAML and nesting too deep for Python's parser are one-line ``ConfigError``s naming ``source``."""
    loader = StrictSafeLoader(stream)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        size = _expanded_size(node, {})
        if size > MAX_YAML_NODES:
            raise ConfigError(f"{source}: YAML aliases expand to over {MAX_YAML_NODES} values (an alias bomb?); "
                              "write the values out")
        return loader.construct_document(node)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or "invalid YAML"
        raise ConfigError(f"{source}:{where}: {problem}") from None
    except RecursionError:
        raise ConfigError(f"{source}: YAML nested too deeply (a config needs a few levels)") from None
    finally:
        loader.dispose()


def read_yaml(path: str | os.PathLike) -> Any:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        with open(path, encoding="utf-8") as f:
            return safe_load_yaml(f, str(path))
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read config: {exc}") from None


def resolve_paths(data: Any, base: Path, keys: tuple[str, ...] = ("root", "checkpoint")) -> Any:
    """Make relative paths in ``keys`` relative to the config file's folder, as a user expects."""
    if isinstance(data, dict):
        out = {}
        for k, v in data.items():
            if k in keys and isinstance(v, str) and v and not os.path.isabs(v):
                out[k] = str((base / v).resolve())
            else:
                out[k] = resolve_paths(v, base, keys)
        return out
    if isinstance(data, list):
        return [resolve_paths(v, base, keys) for v in data]
    return data


def load_config(path: str | os.PathLike, model: type[M] = RunConfig) -> M:  # type: ignore[assignment]
    """Read a YAML file and validate it against ``model`` (default: a downstream ``RunConfig``)."""
    path = Path(path)
    data = read_yaml(path)
    if data is None:  # an empty file would silently train the default model
        raise ConfigError(f"{path}: empty config file (write at least the data section)")
    if isinstance(data, dict):
        data = resolve_paths(data, path.parent.resolve())
    return parse_config(data, model, source=str(path))


def dataset_name(layout: str, loaded_name: str, root: Any = None, label: Optional[str] = None) -> str:
    """What a dataset is called: the user's ``label``, else the loader's name where it says more than the
    layout (``demo-nuclei-B``, ``covidqu-infection``), else the data root's folder name (two ``folders``
    datasets are never both called ``folders``), else the layout."""
    if label:
        return str(label)
    if loaded_name and loaded_name != layout:
        return str(loaded_name)
    return Path(str(root)).name if root else str(loaded_name or layout)


def config_to_dict(config: BaseModel) -> dict[str, Any]:
    """The resolved config as plain JSON-able data (paths as strings); the input of run ids."""
    return config.model_dump(mode="json")
