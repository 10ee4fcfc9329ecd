import json

import lightning as L
import pytest
import torch

from medxfer.config import DataConfig, ModelConfig, PretrainedConfig, RunConfig, TrainConfig
from medxfer.data import load_data
from medxfer.data.patches import predict_logits
from medxfer.evaluation.evaluate import evaluate_cases
from medxfer.finetune import build_model, run_finetune, run_id_for, summary_dice
from medxfer.io import seed_everything
from medxfer.models import build_segmenter, save_encoder
from medxfer.records import REFERENCE_COLUMNS, collect
from medxfer.training.strategies import apply_strategy

TINY = ModelConfig(preset="unet", width=4, depth=3)


def tiny_config(pretrained=None, **train) -> RunConfig:
    return RunConfig(
        pretrained=pretrained or PretrainedConfig(),
        data=DataConfig(name="demo", options={"domain": "A"}, train_images=8),
        model=TINY,
        train=TrainConfig(**{"strategy": "scratch", "max_epochs": 1, "batch_size": 4, "lr": 3e-3, **train}),
    )


def test_run_beats_an_untrained_model_and_writes_its_record(tmp_path):
    config = tiny_config(max_epochs=12, batch_size=4, lr=1e-2)
    run = run_finetune(config, tmp_path)
    record = json.loads((run.run_dir / "result.json").read_text())
    assert record["run_id"] == run_id_for(config) == run.run_dir.name
    assert record["n_train_images"] == 8 and record["loss"]["reason"]
    dice = summary_dice(record)
    assert 0.0 <= dice <= 1.0
    data = load_data(config.data)
    seed_everything(config.seed)
    untrained = evaluate_cases(build_model(config, data), data.test, data.n_classes, size_multiple=4)
    assert dice > untrained.summary["headline"]["value"] + 0.1
    # the headline is the pooled Dice, named in the record, and the first thing the table gives after its own
    assert record["headline"] == {**record["metrics"]["target"]["headline"], "test_set": "target",
                                  "converged": record["convergence"]["converged"]}
    assert record["headline"]["metric"] == "pooled dice index" and record["headline"]["value"] == dice
    assert dice == record["metrics"]["target"]["class_aggregated"]["pooled dice index"]
    assert (run.run_dir / "model.pt").is_file() and not (run.run_dir / "checkpoints").exists()
    table = collect(tmp_path)
    header = table.read_text().splitlines()[0].split(",")
    assert header[: len(REFERENCE_COLUMNS)] == REFERENCE_COLUMNS
    assert {"headline metric", "headline dice", "absent-image false-positive rate"} <= set(header)
    # Same config again: the finished record is reused, not retrained.
    again = run_finetune(config, tmp_path)
    assert again.record["finished"] == record["finished"]


class Interrupt(L.Callback):
    def on_train_epoch_end(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            raise RuntimeError("simulated kill")


def test_interrupted_run_resumes_and_writes_one_record(tmp_path):
    config = tiny_config(max_epochs=3, checkpoint_every_s=None)  # resume checkpoint at every epoch end
    with pytest.raises(RuntimeError, match="simulated kill"):
        run_finetune(config, tmp_path, callbacks=[Interrupt()])
    run_dir = tmp_path / "runs" / run_id_for(config)
    assert not (run_dir / "result.json").exists()
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True, map_location="cpu")
    assert state["global_step"] >= 2  # at least one epoch (2 steps of 4 images) was done before the kill
    run = run_finetune(config, tmp_path)
    assert run.record["steps_trained"] == 3 * 2  # exactly the uninterrupted schedule
    assert len(list((tmp_path / "runs").glob("*/result.json"))) == 1


def _parameter_snapshot(module):
    return {name: p.detach().clone() for name, p in module.named_parameters()}


def _changed(before, module):
    return {name for name, p in module.named_parameters() if not torch.equal(before[name], p.detach())}


@pytest.mark.parametrize("strategy,frozen_levels", [("frozen_encoder", 0), ("partial", 2), ("full", 0),
                                                    ("discriminative", 0)])
def test_each_strategy_trains_only_what_it_should(strategy, frozen_levels):
    torch.manual_seed(0)
    model = build_segmenter(TINY.model_copy(update={"in_channels": 1, "n_classes": 2}))
    train = TrainConfig(strategy=strategy, frozen_levels=frozen_levels, lr=1e-2, encoder_lr_factor=0.1)
    groups = apply_strategy(model, train)
    optimizer = torch.optim.SGD(groups, lr=train.lr)
    before = _parameter_snapshot(model)
    model.train()
    x, y = torch.randn(2, 1, 16, 16), torch.randint(0, 2, (2, 16, 16))
    torch.nn.functional.cross_entropy(model(x), y).backward()
    optimizer.step()
    changed = _changed(before, model)
    encoder_names = {f"encoder.{n}" for n, _ in model.encoder.named_parameters()}
    decoder_changed = changed - encoder_names
    assert decoder_changed, "the decoder must train in every strategy"
    if strategy == "frozen_encoder":
        assert not (changed & encoder_names)
    elif strategy == "partial":
        frozen = {name for name in encoder_names if not dict(model.named_parameters())[name].requires_grad}
        assert frozen and not (changed & frozen)
        assert (changed & encoder_names) - frozen
    else:
        assert changed & encoder_names
    if strategy == "discriminative":
        lrs = {g["name"]: g["lr"] for g in groups}
        assert lrs["encoder"] == pytest.approx(lrs["decoder"] * 0.1)


def test_patch_inference_reproduces_full_size_outputs():
    torch.manual_seed(0)
    model = build_segmenter(TINY.model_copy(update={"in_channels": 1, "n_classes": 2})).eval()
    x = torch.randn(1, 1, 40, 56)
    whole = predict_logits(model, x, None, size_multiple=4)
    assert whole.shape == (1, 2, 40, 56)
    patched = predict_logits(model, x, patch_size=[16, 16], size_multiple=4, overlap=0.5)
    assert patched.shape == whole.shape
    # Far from window borders a fully convolutional model gives the same answer patch-wise and whole.
    assert torch.corrcoef(torch.stack([patched.flatten(), whole.flatten()]))[0, 1] > 0.9


def test_patch_training_runs_with_sliding_window_evaluation(tmp_path):
    config = tiny_config(max_steps=3).model_copy(update={"data": DataConfig(
        name="demo", options={"domain": "B"}, train_images=5, patch_size=[32, 32], foreground_ratio=0.9)})
    run = run_finetune(config, tmp_path)
    assert run.record["metrics"]["target"]["n_images"] == 8
    assert run.record["steps_trained"] == 3
    # the record says which implementation and convention produced each metric, and the NSD's tau
    provenance = run.record["metrics"]["target"]["provenance"]
    assert provenance["nsd"]["tolerance"] == config.evaluation.nsd_tolerance
    assert set(provenance) >= {"dice index", "hd95", "hausdorff distance", "assd", "nsd"}
    assert "nsd" in run.record["metrics"]["target"]["per_image_mean"]


def test_full_model_and_encoder_starting_points_load(tmp_path):
    source = run_finetune(tiny_config(max_steps=2), tmp_path)
    for load in ("full", "encoder_decoder", "encoder"):
        config = tiny_config(strategy="full", max_steps=1).model_copy(update={
            "pretrained": PretrainedConfig(checkpoint=source.run_dir / "model.pt", load=load)})
        seed_everything(0)
        data = load_data(config.data)
        from medxfer.finetune import _load_starting_weights

        model = build_model(config, data)
        info = _load_starting_weights(model, config)
        assert info["checkpoint"] == str(source.run_dir / "model.pt")
        reference = build_model(config, data)
        from medxfer.models import load_model_weights

        load_model_weights(reference, source.run_dir / "model.pt")
        for (name, p), (_, q) in zip(model.encoder.state_dict().items(), reference.encoder.state_dict().items()):
            assert torch.equal(p, q), name
        head, reference_head = model.head.state_dict(), reference.head.state_dict()
        heads_equal = all(torch.equal(head[k], reference_head[k]) for k in head)
        assert heads_equal == (load == "full")


def test_encoder_checkpoint_folder_with_length(tmp_path):
    encoder_model = build_segmenter(TINY.model_copy(update={"in_channels": 1, "n_classes": 2}))
    for length in (0, 3):
        save_encoder(encoder_model, tmp_path / "ckpt" / f"encoder_len{length:04d}.pt", length=length,
                     source="test", val_accuracy=0.5 + length / 10, scheme="simple")
    config = tiny_config(PretrainedConfig(checkpoint=tmp_path / "ckpt", length=3), strategy="frozen_encoder",
                         max_steps=1)
    run = run_finetune(config, tmp_path / "out")
    assert run.record["pretraining"]["length"] == 3
    assert run.record["pretraining"]["accuracy"] == pytest.approx(0.8)
    assert run.record["pretraining"]["scheme"] == "simple"
    assert run.record["freeze_encoder"] is True


def test_precision_auto_is_fp32_on_cpu_and_explicit_values_pass_through(monkeypatch):
    from medxfer.training.strategies import prefers_channels_last, resolve_precision

    plain = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.Conv2d(8, 8, 1))
    depthwise = torch.nn.Sequential(torch.nn.Conv2d(1, 8, 3), torch.nn.Conv2d(8, 8, 3, groups=8))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_precision("auto") == "32-true"
    # CPU: channels-last only for 2D models with depthwise convolutions (benchmarks/bench_layout.py)
    assert not prefers_channels_last(plain, 2) and prefers_channels_last(depthwise, 2)
    assert not prefers_channels_last(depthwise, 3)
    assert resolve_precision("16-mixed") == "16-mixed"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert resolve_precision("auto") == "bf16-mixed" and prefers_channels_last(plain, 2)
    assert not prefers_channels_last(plain, 3)


def test_best_weights_keeps_the_best_epoch_and_survives_a_resume():
    from types import SimpleNamespace

    from medxfer.training.tasks import BestWeights

    module = SimpleNamespace(model=torch.nn.Linear(2, 1))
    keeper = BestWeights("val_dice")
    kept = None
    for epoch, score in enumerate([0.3, 0.5, 0.4]):
        with torch.no_grad():
            module.model.weight.fill_(float(epoch))
        trainer = SimpleNamespace(callback_metrics={"val_dice": torch.tensor(score)}, sanity_checking=False)
        keeper.on_validation_end(trainer, module)
        if score == 0.5:
            kept = module.model.weight.detach().clone()
    assert keeper.best_score == 0.5
    assert torch.equal(keeper.best_state["weight"], kept)
    resumed = BestWeights("val_dice")
    resumed.load_state_dict(keeper.state_dict())
    assert resumed.best_score == 0.5 and torch.equal(resumed.best_state["weight"], kept)


def test_whole_image_inference_pads_to_the_total_stride_and_crops_back():
    torch.manual_seed(0)
    model = build_segmenter(TINY.model_copy(update={"in_channels": 1, "n_classes": 2})).eval()
    x = torch.randn(1, 1, 37, 50)  # not multiples of the total stride (4)
    logits = predict_logits(model, x, None, size_multiple=4)
    assert logits.shape == (1, 2, 37, 50)
    padded = torch.nn.functional.pad(x, (0, 2, 0, 3), mode="replicate")
    with torch.no_grad():
        assert torch.allclose(logits, model(padded)[:, :, :37, :50])


def test_bad_data_leaves_no_run_folder(tmp_path):
    from medxfer.errors import DataError

    config = tiny_config().model_copy(update={"data": DataConfig(name="folders", root=tmp_path / "missing")})
    with pytest.raises(DataError, match="missing"):
        run_finetune(config, tmp_path / "out")
    assert not (tmp_path / "out").exists()


class _DictBatches(torch.utils.data.Dataset):
    def __init__(self, n: int):
        generator = torch.Generator().manual_seed(0)
        self.images = torch.randn(n, 1, 16, 16, generator=generator)
        self.labels = torch.randint(0, 2, (n, 16, 16), generator=generator)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "label": self.labels[i]}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_gradients_are_released_before_each_forward_pass_unless_accumulating(accumulate):
    from medxfer.training.losses import build_loss
    from medxfer.training.tasks import ClassificationTask, SegmentationTask, TrainingTask

    model = build_segmenter(preset="unet", in_channels=1, n_classes=2, width=2, depth=2)
    grads_alive_at_forward = []
    model.register_forward_pre_hook(
        lambda module, args: grads_alive_at_forward.append(any(p.grad is not None for p in module.parameters())))
    task = SegmentationTask(model, build_loss("dice_ce"), TrainConfig(max_steps=3, scheduler="none"), n_classes=2)
    trainer = L.Trainer(max_steps=3, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accumulate_grad_batches=accumulate)
    trainer.fit(task, torch.utils.data.DataLoader(_DictBatches(12), batch_size=2))
    assert len(grads_alive_at_forward) == 3 * accumulate
    # a plain loop's memory profile: the last step's gradients are gone before the next forward pass;
    # while accumulating, the second batch of each step must still see the first one's gradients
    assert any(grads_alive_at_forward) == (accumulate > 1)
    assert issubclass(ClassificationTask, TrainingTask)


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw"])
def test_optimizers_are_fused_on_the_cpu_and_step_like_the_default(name):
    from medxfer.training.strategies import make_optimizer

    torch.manual_seed(0)
    a, b = torch.nn.Linear(4, 3), torch.nn.Linear(4, 3)
    b.load_state_dict(a.state_dict())
    fused = make_optimizer(name, [{"params": list(a.parameters()), "weight_decay": 0.01}], lr=0.1)
    assert fused.defaults["fused"] is True
    reference_class = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[name]
    extra = {"momentum": 0.9} if name == "sgd" else {}
    reference = reference_class(b.parameters(), lr=0.1, weight_decay=0.01, **extra)
    x = torch.randn(8, 4)
    for _ in range(3):
        for model, optimizer in ((a, fused), (b, reference)):
            optimizer.zero_grad()
            model(x).square().mean().backward()
            optimizer.step()
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        make_optimizer("lamb", [{"params": list(a.parameters())}], lr=0.1)


@pytest.mark.parametrize("every, expected", [(None, 6), (3, 2)])
def test_validation_runs_every_n_steps_when_asked(tmp_path, every, expected):
    class CountValidations(L.Callback):
        calls: list = []

        def on_validation_end(self, trainer, pl_module):
            self.calls.append(trainer.global_step)

    counter = CountValidations()
    counter.calls = []
    # 4 training images, batch 4: one step per epoch, so per-epoch validation runs after every step
    config = tiny_config(max_steps=6, batch_size=4, val_every_n_steps=every)
    config = config.model_copy(update={"data": config.data.model_copy(update={"train_images": 4})})
    run_finetune(config, tmp_path, callbacks=[counter])
    assert len(counter.calls) == expected
    if every:
        assert counter.calls == [3, 6]
