"""Encoder weights: round trips, transfer between models, timm imports, refusals, folders, freezing."""

from __future__ import annotations

import os
import pickle

import pytest
import torch

from medxfer.errors import CheckpointError, ConfigError
from medxfer.models import (
    build_classifier,
    build_segmenter,
    checkpoint_filename,
    count_parameters,
    create_encoder,
    encoder_from_checkpoint,
    freeze_encoder,
    list_checkpoints,
    load_encoder_weights,
    read_manifest,
    resolve_checkpoint,
    save_encoder,
)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def randomize_batchnorm(module: torch.nn.Module) -> None:
    """Give BN buffers non-default values, so a round trip that forgets buffers is caught."""
    for m in module.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)


def features(encoder, x):
    encoder.eval()
    with torch.no_grad():
        return encoder(x)


def assert_same_features(a, b):
    assert len(a) == len(b)
    for fa, fb in zip(a, b):
        assert torch.equal(fa, fb)


def test_round_trip_gives_identical_outputs_and_a_full_manifest(tmp_path):
    encoder = create_encoder("unet", 2, width=4, depth=3, spatial_dims=3)
    randomize_batchnorm(encoder)
    path = save_encoder(encoder, tmp_path / "enc.pt", length=12, source="unit-test", val_accuracy=0.75, scheme="simple")
    assert path.is_file() and (tmp_path / "enc.json").is_file()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]  # atomic writes leave nothing behind
    manifest = read_manifest(path)
    assert manifest["arch"] == encoder.arch
    assert manifest["channels"] == encoder.channels and manifest["strides"] == encoder.strides
    assert (manifest["length"], manifest["source"], manifest["val_accuracy"], manifest["scheme"]) == (
        12, "unit-test", 0.75, "simple")

    x = torch.randn(1, 2, 16, 16, 16)
    rebuilt = encoder_from_checkpoint(path)
    assert_same_features(features(encoder, x), features(rebuilt, x))

    segmenter = build_segmenter(preset="unet3d", in_channels=2, n_classes=2, width=4, depth=3)
    assert load_encoder_weights(segmenter, path)["length"] == 12
    assert_same_features(features(encoder, x), features(segmenter.encoder, x))


def test_save_refuses_extra_fields_that_clash_with_the_manifest(tmp_path):
    encoder = create_encoder("unet", 1, width=2, depth=2)
    with pytest.raises(ConfigError, match="arch"):
        save_encoder(encoder, tmp_path / "e.pt", arch="mine")
    assert not list(tmp_path.iterdir())


def test_classifier_pretrained_encoder_loads_into_a_segmenter(tmp_path):
    encoder = create_encoder("unet", 1, width=4, depth=3)
    classifier = build_classifier(encoder, n_classes=5)
    # One training step, so the weights and BN statistics differ from a fresh initialisation.
    optimizer = torch.optim.SGD(classifier.parameters(), lr=0.1)
    classifier.train()
    loss = torch.nn.functional.cross_entropy(classifier(torch.randn(4, 1, 16, 16)), torch.tensor([0, 1, 2, 3]))
    loss.backward()
    optimizer.step()

    save_encoder(classifier, tmp_path / "pre.pt", length=1)
    torch.save(classifier.state_dict(), tmp_path / "whole_classifier.pt")  # encoder.* plus head.* keys

    x = torch.randn(2, 1, 32, 32)
    expected = features(classifier.encoder, x)
    for file in ("pre.pt", "whole_classifier.pt"):
        segmenter = build_segmenter(preset="attention_unet", in_channels=1, n_classes=3, width=4, depth=3)
        before = {k: v.clone() for k, v in segmenter.decoder.state_dict().items()}
        load_encoder_weights(segmenter, tmp_path / file)
        assert_same_features(expected, features(segmenter.encoder, x))
        assert all(torch.equal(before[k], v) for k, v in segmenter.decoder.state_dict().items())


@pytest.fixture(scope="module")
def timm_resnet18():
    import timm

    torch.manual_seed(1)
    model = timm.create_model("resnet18", pretrained=False).eval()
    randomize_batchnorm(model)
    return model


def test_timm_resnet_state_dict_imports_with_identical_features(tmp_path, timm_resnet18):
    plain = tmp_path / "resnet18.pth"
    torch.save(timm_resnet18.state_dict(), plain)
    # As a training script would write it: wrapped, with DataParallel's "module." prefix.
    wrapped = tmp_path / "resnet18_ddp.pth"
    torch.save({"epoch": 3, "state_dict": {f"module.{k}": v for k, v in timm_resnet18.state_dict().items()}}, wrapped)

    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        reference = timm_resnet18.forward_intermediates(x, intermediates_only=True)
    for file in (plain, wrapped):
        segmenter = build_segmenter(preset="resnet18_attention_unet", in_channels=3, n_classes=2, width=4)
        assert load_encoder_weights(segmenter, file) == {}  # no manifest: an imported state dict
        ours = features(segmenter.encoder, x)
        assert len(ours) == len(reference)
        for a, b in zip(ours, reference):
            assert torch.allclose(a, b, atol=1e-5)


def test_timm_swin_state_dict_imports_with_identical_features(tmp_path):
    import timm

    tiny = dict(img_size=64, window_size=4, embed_dim=12, depths=[1, 1, 1, 1], num_heads=[1, 2, 2, 4])
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, in_chans=1, **tiny).eval()
    path = tmp_path / "swin.pth"
    torch.save({"model": swin.state_dict()}, path)  # "layers.0..." keys, final norm and head included
    encoder = create_encoder("swin_tiny_patch4_window7_224", 1, **tiny)
    load_encoder_weights(encoder, path)
    x = torch.randn(1, 1, 64, 64)
    with torch.no_grad():
        reference = swin.forward_intermediates(x, intermediates_only=True)  # NCHW
    for a, b in zip(features(encoder, x), reference, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


def test_rgb_weights_adapt_to_grayscale_inputs(tmp_path, timm_resnet18):
    path = tmp_path / "resnet18.pth"
    torch.save(timm_resnet18.state_dict(), path)
    encoder = create_encoder("resnet18", 1)
    load_encoder_weights(encoder, path)
    gray = torch.randn(1, 1, 32, 32)
    with torch.no_grad():
        reference = timm_resnet18.forward_intermediates(gray.expand(1, 3, 32, 32), intermediates_only=True)
    assert torch.allclose(features(encoder, gray)[-1], reference[-1], atol=1e-4)
    with pytest.raises(CheckpointError, match="other shapes"):
        load_encoder_weights(create_encoder("resnet18", 1), path, adapt_input_channels=False)


def test_mismatched_architectures_fail_naming_keys(tmp_path, timm_resnet18):
    resnet_file = tmp_path / "resnet18.pth"
    torch.save(timm_resnet18.state_dict(), resnet_file)
    with pytest.raises(CheckpointError) as info:
        load_encoder_weights(create_encoder("resnet34", 3), resnet_file)
    message = str(info.value)
    assert str(resnet_file) in message and "missing key(s)" in message and "body.layer1.2." in message

    unet_file = save_encoder(create_encoder("unet", 1, width=4, depth=3), tmp_path / "unet.pt")
    with pytest.raises(CheckpointError, match=r"other shapes .*levels\.0\.block") as info:
        load_encoder_weights(create_encoder("unet", 1, width=8, depth=3), unet_file)
    assert "width 4 vs 8" in str(info.value)  # the manifest's architecture difference is named too
    with pytest.raises(CheckpointError, match=r"missing key\(s\).*unexpected key\(s\) \(levels\.0"):
        load_encoder_weights(create_encoder("resnet18", 1, depth=2), unet_file)
    with pytest.raises(CheckpointError, match=r"missing key\(s\) \(levels\.3"):
        load_encoder_weights(create_encoder("unet", 1, width=4, depth=4), unet_file)


class _MakesADirectoryWhenUnpickled:
    def __init__(self, target):
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def test_corrupt_and_foreign_files_are_refused_cleanly(tmp_path):
    marker = tmp_path / "code_ran"
    files = {
        "random.pt": os.urandom(4096),
        "text.pt": b"this is a text file\nnot weights\n",
        "empty.pt": b"",
        "evil.pt": pickle.dumps(_MakesADirectoryWhenUnpickled(str(marker)), protocol=2),
    }
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    torch.save([1, 2, 3], tmp_path / "list.pt")
    torch.save({"weights": torch.zeros(2), "note": "hello"}, tmp_path / "mixed.pt")
    encoder = create_encoder("unet", 1, width=2, depth=2)
    for name in [*files, "list.pt", "mixed.pt", "missing.pt"]:
        with pytest.raises(CheckpointError) as info:
            load_encoder_weights(encoder, tmp_path / name)
        assert str(tmp_path / name) in str(info.value) and "\n" not in str(info.value)
    assert not marker.exists()  # weights_only loading never ran the pickled code

    good = save_encoder(encoder, tmp_path / "good.pt")
    (tmp_path / "good.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="good.json"):
        encoder_from_checkpoint(good)


def test_checkpoint_folder_is_listed_by_length(tmp_path):
    encoder = create_encoder("unet", 1, width=2, depth=2)
    for length in (20, 5, 0):
        save_encoder(encoder, tmp_path / checkpoint_filename(length), length=length, val_accuracy=length / 100)
    torch.save(encoder.state_dict(), tmp_path / "stray.pt")  # no manifest: skipped
    listed = list_checkpoints(tmp_path)
    assert [n for n, _, _ in listed] == [0, 5, 20]
    assert [p.name for _, p, _ in listed] == ["encoder_len0000.pt", "encoder_len0005.pt", "encoder_len0020.pt"]
    assert listed[1][2]["val_accuracy"] == 0.05
    assert resolve_checkpoint(tmp_path, 5) == tmp_path / "encoder_len0005.pt"
    with pytest.raises(CheckpointError, match="available: 0, 5, 20"):
        resolve_checkpoint(tmp_path, 7)
    save_encoder(encoder, tmp_path / "again.pt", length=5)
    with pytest.raises(CheckpointError, match="two checkpoints for length 5"):
        list_checkpoints(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        list_checkpoints(tmp_path / "nope")


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed_keys(before, module):
    after = module.state_dict()
    return {k for k, v in before.items() if v.dtype.is_floating_point and not torch.equal(v, after[k])}


def one_step(model, x, n_classes=2):
    model.train()
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randint(0, n_classes, (x.shape[0], *x.shape[2:]))
    torch.nn.functional.cross_entropy(model(x), target).backward()
    optimizer.step()


def test_frozen_encoder_keeps_weights_and_bn_statistics_after_a_step():
    model = build_segmenter(preset="unet", in_channels=1, n_classes=2, width=4, depth=3)
    freeze_encoder(model, "all")
    model.train()  # as Lightning does at each epoch: must not unfreeze BN statistics
    assert not any(m.training for m in model.encoder.modules())
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - count_parameters(model.encoder)
    encoder_before, decoder_before = snapshot(model.encoder), snapshot(model.decoder)
    one_step(model, torch.randn(2, 1, 32, 32))
    assert changed_keys(encoder_before, model.encoder) == set()
    changed = changed_keys(decoder_before, model.decoder)
    assert any(k.endswith("running_mean") for k in changed)  # decoder BN still learns statistics
    assert sum(k.endswith("weight") for k in changed) > 5

    freeze_encoder(model, 0)  # nothing frozen: everything trains again
    model.train()
    encoder_before = snapshot(model.encoder)
    one_step(model, torch.randn(2, 1, 32, 32))
    assert changed_keys(encoder_before, model.encoder) == set(encoder_before) - {
        k for k in encoder_before if k.endswith("num_batches_tracked")}


def _level_of_keys(encoder):
    """State-dict key -> encoder level, from the modules each level owns."""
    names = {id(m): n for n, m in encoder.named_modules()}
    prefixes = [(names[id(m)] + ".", i) for i in range(encoder.n_levels) for m in encoder.level_modules(i)]
    return {k: next(i for p, i in prefixes if k.startswith(p)) for k in encoder.state_dict()}


@pytest.mark.parametrize("preset", ["unet", "resnet18_unet"])
def test_partial_freezing_of_the_first_levels(preset):
    model = build_segmenter(preset=preset, in_channels=1, n_classes=2, width=4, depth=3)
    for m in model.modules():  # timm zero-initialises each block's last BN gamma, which would block gradients
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            torch.nn.init.ones_(m.weight)
    encoder = freeze_encoder(model, 2)
    model.train()
    level_of = _level_of_keys(encoder)
    before = snapshot(model.encoder)
    one_step(model, torch.randn(2, 1, 32, 32))
    changed = changed_keys(before, model.encoder)
    frozen = {k for k, level in level_of.items() if level < 2}
    trainable = {k for k, level in level_of.items() if level >= 2 and not k.endswith("num_batches_tracked")}
    assert frozen and trainable
    assert not (frozen & changed)  # weights and BN statistics of levels 0-1 untouched
    assert trainable <= changed  # level 2 (weights and BN statistics) trained
    with pytest.raises(ConfigError, match="it has 3"):
        freeze_encoder(model, 4)


def test_frozen_bn_statistics_survive_a_lightning_fit():
    import lightning as L

    class Task(L.LightningModule):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def training_step(self, batch, _):
            x, y = batch
            return torch.nn.functional.cross_entropy(self.model(x), y)

        def configure_optimizers(self):
            return torch.optim.SGD([p for p in self.parameters() if p.requires_grad], lr=0.1)

    model = build_segmenter(preset="unet", in_channels=1, n_classes=2, width=2, depth=2)
    freeze_encoder(model, "all")
    data = torch.utils.data.TensorDataset(torch.randn(4, 1, 16, 16), torch.randint(0, 2, (4, 16, 16)))
    before_encoder, before_decoder = snapshot(model.encoder), snapshot(model.decoder)
    trainer = L.Trainer(max_steps=2, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(Task(model), torch.utils.data.DataLoader(data, batch_size=2))
    assert changed_keys(before_encoder, model.encoder) == set()
    assert any(k.endswith("running_mean") for k in changed_keys(before_decoder, model.decoder))


def test_whole_model_checkpoint_round_trip_and_mismatch(tmp_path):
    from medxfer.models import build_segmenter, load_model_weights, model_from_checkpoint, save_model_weights

    spec = {"preset": "unet", "width": 4, "depth": 3, "in_channels": 1, "n_classes": 3}
    model = build_segmenter(spec).eval()
    path = save_model_weights(model, tmp_path / "model.pt", manifest={"model": spec, "note": "x"})
    rebuilt = model_from_checkpoint(path).eval()
    x = torch.randn(1, 1, 16, 16)
    assert torch.equal(model(x), rebuilt(x))
    other_head = build_segmenter({**spec, "n_classes": 2})
    with pytest.raises(CheckpointError, match="head"):
        load_model_weights(other_head, path)
    load_model_weights(other_head, path, head=False)  # encoder + decoder only: fits
    wider = build_segmenter({**spec, "width": 8})
    with pytest.raises(CheckpointError, match=r"model\.pt.*other shapes"):
        load_model_weights(wider, path)
    (tmp_path / "model.json").write_text('{"format": "something else"}')
    with pytest.raises(CheckpointError, match="not a medxfer model manifest"):
        load_model_weights(model, path)
