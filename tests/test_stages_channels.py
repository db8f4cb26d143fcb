"""Every stage on 6-channel uint16 data: DINO, distill, finetune and eval take ``in_chans`` from the
manifest (a disagreeing one is refused naming both), count C in their FLOPs, and export
``input_size: [6, H, W]`` with the data's per-channel mean / std, loadable with timm. ``channels:``
selects a subset by name: a ChannelViT takes any, a plain ViT only its ``in_chans``, naming the fix.
ChannelViT trains under MAE and DINO."""

from __future__ import annotations

import json

import pytest
import timm
import torch

from _cells import CHANNELS, cells, write_npy_shards
from dataprep.loader import StreamingLoader
from jobs.dino import DINOConfig, DINOMethod
from jobs.distill import DistillConfig, DistillMethod
from jobs.engine import StageContext
from jobs.evaluate import EvalConfig, evaluate_model
from jobs.export import export_encoder
from jobs.finetune import FinetuneConfig, FinetuneMethod
from jobs.mae import MAEConfig, MAEMethod
from jobs.models import ModelConfig, build_encoder

TINY = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32, "num_heads": 2}
CVIT = {**TINY, "arch": "channelvit_tiny_patch16_224"}
HEAD = {"out_dim": 64, "hidden_dim": 32, "bottleneck_dim": 16}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """24 train + 6 val samples of 6 uint16 channels named DNA … BF; returns (url, ChannelInfo)."""
    root = str(tmp_path_factory.mktemp("cells6"))
    train, val = cells(per_class=8, classes=3, size=32), cells(per_class=2, classes=3, size=32, seed=1)
    info = write_npy_shards(root, [a for a, _ in train], labels=[lb for _, lb in train], val=val, names=CHANNELS)
    return root, info


def _ctx(tmp_path, data_url: str, **refs) -> StageContext:
    return StageContext(stage_url=str(tmp_path / "stage"), data_url=data_url, launcher="local", refs=refs)


def _batch(method, data_url: str, n: int = 6):
    return next(iter(StreamingLoader(data_url, batch_size=n, transform=method.train_transform())))


def _dino(tmp_path, data_url: str, model: dict) -> tuple[DINOMethod, torch.nn.Module]:
    method = DINOMethod(DINOConfig(name="dino", data=data_url, model=model, head=HEAD, local_crops=2, local_size=16))
    method.setup(_ctx(tmp_path, data_url))
    torch.manual_seed(0)
    student = method.build_model()
    method.set_run_length(10, 5)
    return method, student


def _export_config(url) -> dict:
    return json.loads((url / "config.json").read_text())


def test_dino_trains_on_six_channels_and_exports_the_data_statistics(tmp_path, data):
    url, info = data
    method, student = _dino(tmp_path, url, TINY)
    assert method.cfg.model.in_chans == 6
    batch = _batch(method, url)
    assert [tuple(c.shape) for c in batch["image"]] == [(6, 6, 32, 32)] * 2 + [(6, 6, 16, 16)] * 2
    loss, _ = method.step(student, batch, 0)
    loss.backward()
    method.after_step(student, 0)
    assert torch.isfinite(loss)
    rgb = DINOMethod(DINOConfig(name="rgb", data=url, model=TINY, head=HEAD, local_crops=2, local_size=16))
    assert method.flops_per_sample() > rgb.flops_per_sample()  # the patch embedding reads 6 channels, not 3

    method.export(student, str(tmp_path / "export"), rank=0, storage_options={}, extra={})
    config = _export_config(tmp_path / "export")
    pre = config["pretrained_cfg"]
    assert pre["input_size"] == [6, 32, 32] and pre["mean"] == info.mean and pre["std"] == info.std
    assert config["vitforge"]["channels"]["names"] == CHANNELS and config["vitforge"]["channels"]["dtype"] == "uint16"
    loaded = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    x = torch.randn(2, 6, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), student.backbone.eval()(x))

    with pytest.raises(ValueError, match=r"stage 'bad': model.in_chans is 3 but the data at .* has 6 channels "
                                         r"\(DNA, ER, RNA, AGP, Mito, BF\); remove model.in_chans or set it to 6"):
        bad = DINOConfig(name="bad", data=url, model={**TINY, "in_chans": 3}, head=HEAD)
        DINOMethod(bad).setup(_ctx(tmp_path, url))


def _six_channel_export(tmp_path, info, name: str = "teacher", model: dict = TINY) -> str:
    torch.manual_seed(1)
    cfg = ModelConfig(**{**model, "in_chans": 6})
    channels = {"names": info.names, "dtype": info.dtype, "mean": info.mean, "std": info.std}
    export_encoder(build_encoder(cfg), cfg, str(tmp_path / name), channels=channels)
    return str(tmp_path / name)


def test_distill_student_takes_the_data_channels_and_a_teacher_of_other_channels_is_refused(tmp_path, data):
    url, info = data
    student = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32,
               "num_heads": 2}
    method = DistillMethod(DistillConfig(name="distill", data=url, teacher=_six_channel_export(tmp_path, info),
                                         model=student))
    method.setup(_ctx(tmp_path, url))
    assert method.cfg.model.in_chans == 6
    torch.manual_seed(0)
    model = method.build_model()
    loss, _ = method.step(model, _batch(method, url), 0)
    loss.backward()
    assert torch.isfinite(loss) and method.flops_per_sample() > 0
    method.export(model, str(tmp_path / "student"), rank=0, storage_options={}, extra={})
    assert _export_config(tmp_path / "student")["pretrained_cfg"]["input_size"] == [6, 32, 32]
    assert timm.create_model(f"local-dir:{tmp_path / 'student'}", pretrained=True)(torch.randn(1, 6, 32, 32)).ndim == 2

    rgb = ModelConfig(**TINY)
    export_encoder(build_encoder(rgb), rgb, str(tmp_path / "rgb"))
    with pytest.raises(ValueError, match=r"the teacher takes 3 input channels but the data at .* has 6 \(DNA, ER"):
        DistillMethod(DistillConfig(name="d", data=url, teacher=str(tmp_path / "rgb"), model=student)).setup(
            _ctx(tmp_path, url))


def _finetune(tmp_path, url: str, **fields) -> FinetuneMethod:
    method = FinetuneMethod(FinetuneConfig(name="ft", data=url, **fields))
    method.setup(_ctx(tmp_path, url, **({"init": fields["init"]} if "init" in fields else {})))
    return method


def test_finetune_on_six_channels_and_on_a_named_subset(tmp_path, data):
    url, info = data
    method = _finetune(tmp_path, url, init=_six_channel_export(tmp_path, info), mode="linear")
    torch.manual_seed(0)
    model = method.build_model()
    batch = _batch(method, url)
    loss, _ = method.step(model, batch, 0)
    loss.backward()
    assert torch.isfinite(loss) and method.eval_step(model.eval(), {**batch, "pad": torch.zeros(6, dtype=torch.bool)})
    method.export(model, str(tmp_path / "ft"), rank=0, storage_options={}, extra={})
    assert _export_config(tmp_path / "ft")["pretrained_cfg"]["input_size"] == [6, 32, 32]

    # from scratch on two channels: in_chans 2, the export records those two channels' statistics
    scratch = _finetune(tmp_path, url, model={**TINY, "drop_path_rate": 0.0}, channels=["Mito", "DNA"], mode="full")
    model = scratch.build_model()
    loss, _ = scratch.step(model, _batch(scratch, url), 0)
    assert torch.isfinite(loss) and model.patch_embed.proj.in_channels == 2
    scratch.export(model, str(tmp_path / "ft2"), rank=0, storage_options={}, extra={})
    config = _export_config(tmp_path / "ft2")
    assert config["pretrained_cfg"]["input_size"] == [2, 32, 32] and config["pretrained_cfg"]["mean"] == [
        info.mean[4], info.mean[0]] and config["vitforge"]["channels"]["names"] == ["Mito", "DNA"]

    with pytest.raises(ValueError, match=r"stage 'ft': channels: \['DNA', 'ER', 'RNA', 'AGP'\] selects 4 channels, "
                                         r"but the model \(vit_tiny_patch16_224\) takes exactly in_chans=6.*use a "
                                         r"ChannelViT \(model: \{arch: channelvit_tiny_patch16_224\}\)"):
        _finetune(tmp_path, url, init=str(tmp_path / "teacher"), channels=CHANNELS[:4])
    with pytest.raises(ValueError, match=r"channels: \['Golgi'\] are not channels of the data; it has \['DNA'"):
        _finetune(tmp_path, url, init=str(tmp_path / "teacher"), channels=["Golgi"])


def test_channelvit_finetunes_and_evaluates_on_any_subset_of_its_channels(tmp_path, data):
    url, info = data
    export, plain = _six_channel_export(tmp_path, info, "cvit", CVIT), _six_channel_export(tmp_path, info)
    method = _finetune(tmp_path, url, init=export, channels=["RNA", "DNA", "BF"], mode="linear")
    model = method.build_model()
    assert model.encoder.channel_subset == [2, 0, 5]
    loss, _ = method.step(model, _batch(method, url), 0)
    assert torch.isfinite(loss)
    method.export(model, str(tmp_path / "cvit-ft"), rank=0, storage_options={}, extra={})
    assert _export_config(tmp_path / "cvit-ft")["vitforge"]["channels"]["input"] == ["RNA", "DNA", "BF"]

    cfg = EvalConfig(name="ev", data=url, models=["cvit"], channels=["AGP", "ER"], probe={"epochs": 2},
                     loader_workers=0)
    result = evaluate_model("cvit", export, cfg, url, num_classes=3, device=torch.device("cpu"))
    assert result.val_samples == 6 and result.feature_dim == 32
    full = evaluate_model("plain", plain, cfg.model_copy(update={"channels": None}), url, 3, device=torch.device("cpu"))
    assert full.train_samples == 24
    with pytest.raises(ValueError, match=r"eval 'ev', model 'plain': channels: \['AGP', 'ER'\] selects 2 channels"):
        evaluate_model("plain", plain, cfg, url, 3, device=torch.device("cpu"))


def test_withhold_evaluates_a_channelvit_on_the_rest_and_a_plain_vit_on_zeros_in_their_place(tmp_path, data):
    from jobs._channels import plan_channels
    from jobs.evaluate import _loader, extract_features, knn_accuracy
    from jobs.export import load_export

    url, info = data
    cvit, plain = _six_channel_export(tmp_path, info, "cvit", CVIT), _six_channel_export(tmp_path, info)
    cpu = torch.device("cpu")
    cfg = EvalConfig(name="ev", data=url, models=["m"], withhold=["Mito", "BF"], probe={"epochs": 2}, loader_workers=0)
    held = evaluate_model("cvit", cvit, cfg, url, 3, device=cpu)
    subset = evaluate_model("cvit", cvit, cfg.model_copy(update={"withhold": None, "channels": CHANNELS[:4]}), url, 3,
                            device=cpu)
    assert (held.withheld, held.withheld_as) == (["Mito", "BF"], "absent")
    assert (held.knn_top1, held.linear_top1) == (subset.knn_top1, subset.linear_top1)  # it reads the other four
    model, pre = load_export(cvit), json.loads((tmp_path / "cvit" / "config.json").read_text())["pretrained_cfg"]
    every = extract_features(model, _loader(cfg, url, "train", 32, pre, None), "token", cpu)  # bank: all six
    four = plan_channels("ev", None, CHANNELS, CVIT["arch"], 6, withheld=["Mito", "BF"])
    four.bind(model)
    query = extract_features(model, _loader(cfg, url, "val", 32, pre, None), "token", cpu, four)
    assert held.withheld_at_test["knn_top1"] == knn_accuracy(every, query, 3, cfg.knn_k, cfg.knn_temperature)

    result = evaluate_model("plain", plain, cfg, url, 3, device=cpu)
    assert (result.withheld, result.withheld_as, result.train_samples) == (["Mito", "BF"], "zero", 24)
    plan = plan_channels("ev", None, CHANNELS, TINY["arch"], 6, withheld=["BF", "Mito"])
    model = load_export(plain)
    pre = json.loads((tmp_path / "teacher" / "config.json").read_text())["pretrained_cfg"]
    first = next(iter(_loader(cfg, url, "val", 32, pre, None)))
    batch = first["image"][~first["pad"]]
    zeroed = batch.clone()
    zeroed[:, 4:] = 0  # normalised images: zero is each channel's train mean
    got = extract_features(model, _loader(cfg, url, "val", 32, pre, None), "token", cpu, plan).x
    assert torch.allclose(got, model.eval().forward_features(zeroed)[:, 0], atol=1e-6)
    assert torch.equal(plan.select(batch)[:, :4], batch[:, :4]) and bool(batch[:, 4:].abs().sum() > 0)  # not in place

    with pytest.raises(ValueError, match=r"eval 'ev', model 'plain': withhold: \['Golgi'\] are not among the data's "
                                         r"channels \['DNA'"):
        evaluate_model("plain", plain, cfg.model_copy(update={"withhold": ["Golgi"]}), url, 3, device=cpu)
    with pytest.raises(ValueError, match=r"withhold: \['ER'\] are not among the channels: it selects \['DNA', 'RNA'\]"):
        plan_channels("ev", ["DNA", "RNA"], CHANNELS, CVIT["arch"], 6, withheld=["ER"])
    with pytest.raises(ValueError, match=r"withholds every channel the model reads; keep at least one"):
        plan_channels("ev", ["DNA", "RNA"], CHANNELS, CVIT["arch"], 6, withheld=["RNA", "DNA"])


def test_channelvit_trains_under_mae_and_dino_and_its_exports_load_through_timm(tmp_path, data):
    url, _ = data
    mae = MAEMethod(MAEConfig(name="mae", data=url, model=CVIT, decoder={"embed_dim": 32, "depth": 1, "num_heads": 2}))
    mae.setup(_ctx(tmp_path, url))
    torch.manual_seed(0)
    model = mae.build_model()
    assert model.length == 6 * 16 and model.decoder_pred.out_features == 8 * 8  # one token per channel and patch
    batch, opt = _batch(mae, url, 12), torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(8):  # the same batch and masks: the loss must fall
        loss, _ = mae.step(model, batch, 0)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.9 * losses[0], losses

    dino, student = _dino(tmp_path, url, CVIT)
    before = [p.clone() for p in dino.teacher.parameters()]
    loss, _ = dino.step(student, _batch(dino, url), 0)
    loss.backward()
    torch.optim.SGD(student.parameters(), lr=0.1).step()
    dino.after_step(student, 0)
    assert torch.isfinite(loss) and any(not torch.equal(a, b) for a, b in zip(before, dino.teacher.parameters()))

    import jobs.models  # noqa: F401  registers channelvit_* with timm (as any user does before create_model)

    for method, module, name in ((mae, model, "mae-export"), (dino, student, "dino-export")):
        method.export(module, str(tmp_path / name), rank=0, storage_options={}, extra={})
        loaded = timm.create_model(f"local-dir:{tmp_path / name}", pretrained=True).eval()
        assert list(loaded.pretrained_cfg["input_size"]) == [6, 32, 32]
        assert _export_config(tmp_path / name)["pretrained_cfg"]["input_size"] == [6, 32, 32]
        assert loaded(torch.randn(1, 4, 32, 32), channels=[0, 1, 2, 5]).shape == (1, 32)


def test_a_subset_a_plain_vit_cannot_take_is_refused_when_the_run_starts(tmp_path):
    from jobs._channel_check import check_stage_channels
    from pipeline.spec import parse_spec

    def spec(arch: str, stage: dict) -> object:
        return parse_spec({"name": "c", "storage": str(tmp_path / "runs"), "stages": [
            {"name": "data", "kind": "prep", "source": str(tmp_path / "cells.csv"), "source_kind": "csv",
             "format": "npy", "channels": CHANNELS},
            {"name": "pretrain", "kind": "mae", "data": "data", "model": {**TINY, "arch": arch}}, stage]})

    ft = {"name": "ft", "kind": "finetune", "data": "data", "init": "pretrain", "channels": ["DNA", "ER"]}
    with pytest.raises(ValueError, match=r"stages\[2\] \(ft\) > channels, model 'pretrain': channels: \['DNA', 'ER'\] "
                                         r"selects 2 channels, but the model \(vit_tiny_patch16_224\) takes exactly "
                                         r"in_chans=6.*use a ChannelViT"):
        check_stage_channels(spec("vit_tiny_patch16_224", ft))
    ev = {"name": "ev", "kind": "eval", "data": "data", "models": ["pretrain"], "channels": ["DNA", "Golgi"]}
    with pytest.raises(ValueError, match=r"channels: \['Golgi'\] are not channels of the data"):
        check_stage_channels(spec("channelvit_tiny_patch16_224", ev))
    check_stage_channels(spec("channelvit_tiny_patch16_224", ft))  # any subset of its channels
    held = {"name": "ev", "kind": "eval", "data": "data", "models": ["pretrain"], "withhold": ["Golgi"]}
    with pytest.raises(ValueError, match=r"stages\[2\] \(ev\) > withhold, model 'pretrain': withhold: \['Golgi'\] "
                                         r"are not among the data's channels"):
        check_stage_channels(spec("vit_tiny_patch16_224", held))
    check_stage_channels(spec("vit_tiny_patch16_224", {**held, "withhold": ["BF"]}))  # a plain ViT: zeros instead
