"""Deep supervision: auxiliary heads on the decoder's intermediate resolutions, nnU-Net's loss weights, training
only (inference returns the full-resolution logits alone), and checkpoints with and without the heads."""

from __future__ import annotations

import pytest
import torch

import medxfer.training.tasks as tasks
from medxfer.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from medxfer.errors import ConfigError
from medxfer.finetune import run_finetune
from medxfer.models import build_segmenter, load_model_weights, save_model_weights
from medxfer.training.losses import build_loss, deep_supervision_loss, deep_supervision_weights


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def test_weights_are_nnunets_with_the_coarsest_output_dropped():
    # nnU-Net: 1/2**i over the decoder's 4 outputs, the last (coarsest) set to 0, normalised
    nnunet = [1.0, 0.5, 0.25, 0.0]
    expected = [w / sum(nnunet) for w in nnunet[:3]]
    assert deep_supervision_weights(3) == pytest.approx(expected)
    assert deep_supervision_weights(1) == [1.0]


@pytest.mark.parametrize("preset, depth, shape, sizes", [
    ("unet3d", 5, (2, 1, 16, 16, 16), [16, 8, 4]),  # decoder outputs at strides 8, 4, 2, 1: 8 dropped
    ("attention_unet", 4, (2, 1, 32, 32), [32, 16]),
    ("resnet18_unet", 3, (2, 1, 32, 32), [32, 16]),  # strides 4, 2 (skip), then 1 (extra stage): 4 dropped
    ("genesis_unet3d", 4, (2, 1, 16, 16, 16), [16, 8]),
    ("monai_dynunet", 4, (2, 1, 16, 16, 16), [16, 8]),  # MONAI's decoder blocks: the same heads
    ("monai_basicunet", 5, (2, 1, 32, 32, 32), [32, 16, 8]),
])
def test_heads_sit_on_the_intermediate_resolutions_and_inference_sees_only_the_full_one(preset, depth, shape, sizes):
    model = build_segmenter(preset=preset, in_channels=1, n_classes=3, width=2, depth=depth,
                            options={"deep_supervision": True})
    assert model.deep_supervision and len(model.aux_heads) == len(sizes) - 1
    x = torch.randn(shape)
    model.train()
    outputs = model.forward_deep_supervision(x)
    assert [tuple(o.shape) for o in outputs] == [(shape[0], 3, *[s] * (len(shape) - 2)) for s in sizes]
    # forward stays one full-resolution tensor, in training as in eval mode
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), model.forward_deep_supervision(x)[0])
    model.train()
    assert isinstance(model(x), torch.Tensor)
    # every auxiliary head gets a gradient from the deep-supervision loss
    target = torch.randint(0, 3, (shape[0], *shape[2:]))
    deep_supervision_loss(build_loss("dice_ce"), outputs, target).backward()
    assert all(p.grad is not None for p in model.aux_heads.parameters())


def test_without_the_option_there_are_no_heads_and_one_output():
    model = build_segmenter(preset="unet3d", in_channels=1, n_classes=2, width=2, depth=4)
    assert not model.deep_supervision and not any(k.startswith("aux_heads") for k in model.state_dict())
    assert len(model.forward_deep_supervision(torch.randn(1, 1, 16, 16, 16))) == 1


def test_loss_is_the_weighted_sum_over_nearest_downsampled_labels_keeping_ignored_voxels():
    loss = build_loss("dice_ce")
    target = torch.randint(0, 3, (2, 16, 16, 16))
    target[:, :4] = 255  # ignored slab: stays ignored at every scale
    outputs = [torch.randn(2, 3, 16, 16, 16), torch.randn(2, 3, 8, 8, 8), torch.randn(2, 3, 4, 4, 4)]
    # nearest(-exact) from 16 to 8 picks voxels 1, 3, 5, ...; to 4 picks 2, 6, 10, 14
    expected = sum(w * loss(o, t) for w, o, t in zip(
        deep_supervision_weights(3), outputs,
        [target, target[:, 1::2, 1::2, 1::2], target[:, 2::4, 2::4, 2::4]]))
    assert float(deep_supervision_loss(loss, outputs, target)) == pytest.approx(float(expected), rel=1e-5)
    # partial labels reach every term
    partial = build_loss("partial_dice_ce")
    annotated = [(1,), (1, 2)]
    target[0][target[0] == 2] = 0  # case 0 annotates class 1 alone
    expected = sum(w * partial(o, t, annotated=annotated) for w, o, t in zip(
        deep_supervision_weights(2), outputs[:2], [target, target[:, 1::2, 1::2, 1::2]]))
    got = deep_supervision_loss(partial, outputs[:2], target, annotated=annotated)
    assert float(got) == pytest.approx(float(expected), rel=1e-5)


@pytest.mark.parametrize("options, fragment", [
    ({"deep_supervision": True}, "deep supervision needs 2 or more"),
    ({"deep_supervision": "yes"}, "true or false"),
])
def test_bad_deep_supervision_settings_are_one_line_config_errors(options, fragment):
    with pytest.raises(ConfigError, match=fragment) as info:
        build_segmenter(preset="unet3d", in_channels=1, n_classes=2, width=2, depth=3, options=options)
    assert "\n" not in str(info.value)


def test_checkpoints_load_across_models_with_and_without_heads(tmp_path):
    deep = build_segmenter(preset="unet3d", in_channels=1, n_classes=3, width=2, depth=4,
                           options={"deep_supervision": True})
    path = save_model_weights(deep, tmp_path / "model.pt", manifest={"model": deep.spec})
    plain = build_segmenter(preset="unet3d", in_channels=1, n_classes=3, width=2, depth=4)
    load_model_weights(plain, path)  # the heads train only: a model without them takes the rest
    assert torch.equal(plain.head.weight, deep.head.weight)
    other = build_segmenter(preset="unet3d", in_channels=1, n_classes=5, width=2, depth=4,
                            options={"deep_supervision": True})
    load_model_weights(other, path, head=False)  # new classes: heads (auxiliary ones too) stay new
    assert torch.equal(other.decoder.stages[0].block[0].weight, deep.decoder.stages[0].block[0].weight)


def test_a_run_trains_with_the_deep_supervision_loss(tmp_path, monkeypatch):
    calls = []

    def counting(loss, outputs, target, annotated=None):
        calls.append(len(outputs))
        return deep_supervision_loss(loss, outputs, target, annotated=annotated)

    monkeypatch.setattr(tasks, "deep_supervision_loss", counting)
    config = RunConfig(
        data=DataConfig(name="demo", options={"domain": "A"}, train_images=4),
        model=ModelConfig(preset="unet", width=4, depth=4, options={"deep_supervision": True}),
        train=TrainConfig(strategy="scratch", max_steps=2, batch_size=2),
    )
    run = run_finetune(config, tmp_path)
    assert calls == [2, 2]  # full resolution + 1 auxiliary output (strides 4, 2, 1: 4 dropped), at each step
    saved = torch.load(run.run_dir / "model.pt", weights_only=True)
    assert any(k.startswith("aux_heads.") for k in saved)
