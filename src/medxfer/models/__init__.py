"""The model zoo: encoders, decoders, segmentation presets, classifiers and encoder weights.

Every segmentation model is ``Encoder + Decoder + 1x1 head``; the same encoder object serves
classification pretraining, transferability scoring and fine-tuning. See ``PRESETS`` / ``preset_table``.
"""

# genesis and monai_networks register their encoders with ``encoders`` (create_encoder, encoder_from_arch)
from medxfer.models import genesis, monai_networks  # noqa: F401  (imported for the registration)
from medxfer.models.classifier import Classifier, build_classifier
from medxfer.models.decoders import AttentionGate, AttentionUNetDecoder, UNetDecoder
from medxfer.models.encoders import (
    Encoder,
    InputShapeError,
    TimmEncoder,
    UNetEncoder,
    create_encoder,
    encoder_from_arch,
)
from medxfer.models.parameters import count_parameters
from medxfer.models.segmenter import (
    PRESETS,
    Preset,
    Segmenter,
    build_encoder,
    build_segmenter,
    model_from_checkpoint,
    preset_table,
)
from medxfer.models.weights import (
    checkpoint_filename,
    encoder_from_checkpoint,
    freeze_encoder,
    get_encoder,
    import_state_dict,
    list_checkpoints,
    load_encoder_weights,
    load_model_weights,
    read_manifest,
    read_model_manifest,
    read_state_dict,
    resolve_checkpoint,
    save_encoder,
    save_model_weights,
)

__all__ = [
    "AttentionGate",
    "AttentionUNetDecoder",
    "Classifier",
    "Encoder",
    "InputShapeError",
    "PRESETS",
    "Preset",
    "Segmenter",
    "TimmEncoder",
    "UNetDecoder",
    "UNetEncoder",
    "build_classifier",
    "build_encoder",
    "build_segmenter",
    "checkpoint_filename",
    "count_parameters",
    "create_encoder",
    "encoder_from_arch",
    "encoder_from_checkpoint",
    "freeze_encoder",
    "get_encoder",
    "import_state_dict",
    "list_checkpoints",
    "load_encoder_weights",
    "load_model_weights",
    "model_from_checkpoint",
    "read_model_manifest",
    "preset_table",
    "read_manifest",
    "read_state_dict",
    "resolve_checkpoint",
    "save_encoder",
    "save_model_weights",
]
