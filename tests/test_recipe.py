"""The few-image training recipe: fixed-size batches drawn with replacement, a lower encoder lr for a pretrained
encoder, the upsample+conv decoder (old transposed-conv checkpoints still load), nnU-Net's poly schedule."""

import json

import pytest
import torch

from medxfer.config import ModelConfig, RunConfig, TrainConfig
from medxfer.data.base import Case
from medxfer.errors import CheckpointError
from medxfer.finetune import _loaders
from medxfer.models import build_segmenter
from medxfer.models.segmenter import model_from_checkpoint
from medxfer.models.weights import load_model_weights, save_model_weights
from medxfer.training.strategies import apply_strategy, build_optimizer, build_scheduler

TINY = {"preset": "unet", "in_channels": 1, "n_classes": 3, "width": 2, "depth": 3}


def _cases(n):
    return [Case(image=torch.rand(1, 8, 8).numpy(), label=torch.randint(0, 3, (8, 8)).numpy(), case_id=f"c{i}")
            for i in range(n)]


def test_batches_drawn_with_replacement_are_never_short_and_are_seeded():
    config = RunConfig(train={"batch_size": 4}, data={"augment": False})
    assert config.train.sampling == "with_replacement"
    cases = _cases(5)
    first = [b["image"].sum().item() for b in _loaders(config, cases, [], 3, 1)[0]]
    again = [b["image"].sum().item() for b in _loaders(config, cases, [], 3, 1)[0]]
    assert len(first) == 2 and first == again  # an epoch of ceil(5 / 4) full batches; same seed, same draws
    assert [len(b["image"]) for b in _loaders(config, cases, [], 3, 1)[0]] == [4, 4]
    old = RunConfig(train={"batch_size": 4, "sampling": "epochs"}, data={"augment": False})
    assert sorted(len(b["image"]) for b in _loaders(old, cases, [], 3, 1)[0]) == [1, 4]  # the batch of one avoided


def _lrs(strategy, pretrained, **train):
    model = build_segmenter(**TINY)
    cfg = TrainConfig(strategy=strategy, lr=1e-2, **train)
    return {g["name"]: g["lr"] for g in apply_strategy(model, cfg, pretrained=pretrained)}


def test_a_pretrained_encoder_trains_at_a_tenth_of_the_lr_by_default():
    assert _lrs("full", pretrained=True) == {"encoder": pytest.approx(1e-3), "decoder": 1e-2}
    assert _lrs("full", pretrained=False) == {"encoder": 1e-2, "decoder": 1e-2}  # nothing loaded: one lr
    assert _lrs("scratch", pretrained=False) == {"encoder": 1e-2, "decoder": 1e-2}
    assert _lrs("full", pretrained=True, pretrained_encoder_lr_factor=1.0)["encoder"] == 1e-2
    assert _lrs("discriminative", pretrained=True, encoder_lr_factor=0.3)["encoder"] == pytest.approx(3e-3)


def test_nnunet_schedule_is_poly_and_sgd_can_be_nesterov():
    model = torch.nn.Linear(2, 2)
    cfg = TrainConfig(optimizer="sgd", lr=1e-2, momentum=0.99, nesterov=True, scheduler="poly")
    optimizer = build_optimizer([{"params": list(model.parameters())}], cfg)
    assert optimizer.defaults["nesterov"] and optimizer.defaults["momentum"] == 0.99
    scheduler = build_scheduler(optimizer, cfg, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([1e-2 * (1 - k / 10) ** 0.9 for k in range(10)])


def test_interpolating_decoder_is_the_default_and_has_no_transposed_conv():
    new = build_segmenter(**TINY)
    old = build_segmenter(**TINY, upsample="transposed")
    transposed = lambda m: any(isinstance(x, torch.nn.ConvTranspose2d) for x in m.modules())  # noqa: E731
    assert not transposed(new) and transposed(old)
    x = torch.randn(2, 1, 16, 16)
    assert new(x).shape == old(x).shape == (2, 3, 16, 16)
    # a constant feature map upsamples to a constant one: no k x k pattern (what the transposed conv paints)
    stage = new.decoder.stages[0].up
    out = stage(torch.ones(1, stage[0].in_channels, 4, 4))
    assert torch.allclose(out, out[..., :1, :1].expand_as(out), atol=1e-6)


def test_checkpoints_of_the_transposed_decoder_still_load_and_mismatches_say_why(tmp_path):
    old = build_segmenter(**TINY, upsample="transposed")
    spec = ModelConfig(**TINY).model_dump(mode="json")
    del spec["upsample"]  # a manifest written before the key existed
    path = save_model_weights(old, tmp_path / "model.pt", manifest={"model": spec})
    assert json.loads((tmp_path / "model.json").read_text())["model"]["upsample"] == "transposed"  # always named
    manifest = json.loads((tmp_path / "model.json").read_text())
    del manifest["model"]["upsample"]  # as written before the key existed
    (tmp_path / "model.json").write_text(json.dumps(manifest))
    rebuilt = model_from_checkpoint(path)
    x = torch.randn(1, 1, 16, 16)
    assert torch.equal(rebuilt.eval()(x), old.eval()(x))
    with pytest.raises(CheckpointError, match=r"model.pt: does not fit this model: .*set model.upsample"):
        load_model_weights(build_segmenter(**TINY), path)
