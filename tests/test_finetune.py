"""Fine-tuning: the three modes' models, exports and recipes in one process; a label fraction
(stratified, seeded, the same on every rank and after a resume) and random init without an
export; then a 2-worker DeepSpeed gang per mode (ZeRO-2 and ZeRO-3) from a spec whose stages
reference an earlier export, and one from random init on a label fraction."""

from __future__ import annotations

import math

import numpy as np
import pytest
import timm
import torch
import yaml

from _train_util import TINY_MODEL, finish, metrics, stage_store, status, torchrun
from dataprep.labels import label_subset, split_labels
from dataprep.loader import StreamingLoader
from dataprep.manifest import load_manifest
from jobs.engine import StageContext, build_optimizer, param_groups
from jobs.export import export_encoder, load_export_model
from jobs.finetune import FinetuneConfig, FinetuneMethod, merge_lora_state, soft_targets
from jobs.mae import MAEConfig, build_mae
from pipeline.spec import SpecError, parse_spec

TINY_DECODER = {"embed_dim": 32, "depth": 1, "num_heads": 4}


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory) -> str:
    """48 train samples (labels ``i % 3``: 16 per class) in two shards, 10 val, on local disk."""
    from _shards_util import write_shards

    dest = str(tmp_path_factory.mktemp("ft-local-shards"))
    write_shards(dest, {"train": [24, 24], "val": [10]}, classes=3)
    return dest


def set_up(cfg: FinetuneConfig, data_url: str, rank: int = 0, world: int = 1, **refs: str) -> FinetuneMethod:
    method = FinetuneMethod(cfg, rank=rank)
    method.setup(StageContext(stage_url="/unused", data_url=data_url, rank=rank, world_size=world, refs=refs))
    return method


def write_mae_export(dest: str, seed: int = 0) -> None:
    """A (randomly initialised, perturbed) MAE encoder exported as an earlier stage would."""
    torch.manual_seed(seed)
    cfg = MAEConfig(name="pretrain", data="/x", model=TINY_MODEL, decoder=TINY_DECODER)
    encoder = build_mae(cfg).encoder
    with torch.no_grad():
        for p in encoder.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    export_encoder(encoder, cfg.model, dest)


def train_a_few_steps(method: FinetuneMethod, model: torch.nn.Module, steps: int = 3) -> None:
    opt = torch.optim.AdamW(method.param_groups(model, method.cfg.optim), lr=1e-2)
    for step in range(steps):
        batch = {"image": torch.randn(8, 3, 32, 32), "label": torch.randint(0, 3, (8,))}
        loss, _ = method.step(model, batch, step)
        loss.backward()
        opt.step()
        opt.zero_grad()


@pytest.mark.parametrize("mode", ["full", "linear", "lora"])
def test_each_mode_trains_and_exports_a_plain_timm_classifier_with_the_same_outputs(tmp_path, local_shards, mode):
    write_mae_export(str(tmp_path / "mae"))
    cfg = FinetuneConfig(name="ft", data="/x", init="pretrain", mode=mode, num_classes=3)
    method = set_up(cfg, local_shards, init=str(tmp_path / "mae"))
    model = method.build_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if mode == "linear":
        assert trainable == {"head.weight", "head.bias"}  # BatchNorm without affine, frozen encoder
    elif mode == "lora":
        assert trainable and all("lora_" in n or n.startswith("head.") for n in trainable)
        assert any("attn.qkv.lora_A" in n for n in trainable) and any("attn.proj.lora_B" in n for n in trainable)
    train_a_few_steps(method, model)
    if mode == "lora":
        assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n)  # adapters moved

    method.export(model, str(tmp_path / "export"), rank=0, storage_options={}, extra={})
    loaded = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    ours, config = load_export_model(str(tmp_path / "export"))
    assert config["num_classes"] == 3 and not any("lora" in k for k in loaded.state_dict())
    classes = load_manifest(local_shards)[0].classes
    assert len(classes) == 3 and config["label_names"] == classes == loaded.pretrained_cfg["label_names"]
    model.eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        assert want.shape == (4, 3)
        torch.testing.assert_close(loaded(x), want, rtol=1e-4, atol=1e-5)  # BN folding / LoRA merge: fp rounding
        torch.testing.assert_close(ours.eval()(x), want, rtol=1e-4, atol=1e-5)
        batch = {"image": x, "label": torch.tensor([0, 1, 2, 0]), "pad": torch.tensor([False, False, False, True])}
        sums = method.eval_step(model, batch)
    assert sums["count"] == 3 and 0 <= sums["top1"] <= sums["top5"] == 3  # top-5 of 3 classes always hits


@pytest.mark.parametrize("mode", ["linear", "full"])
def test_global_pool_avg_reads_the_mean_normed_patch_token_loads_every_init_tensor_and_exports_it(tmp_path,
                                                                                                 local_shards, mode):
    from jobs.models import pool_features

    write_mae_export(str(tmp_path / "mae"))
    base = set_up(FinetuneConfig(name="ft", data="/x", init="pretrain", mode=mode, num_classes=3), local_shards,
                  init=str(tmp_path / "mae"))
    cfg = FinetuneConfig(name="ft", data="/x", init="pretrain", mode=mode, num_classes=3, global_pool="avg")
    method = set_up(cfg, local_shards, init=str(tmp_path / "mae"))
    assert base.cfg.digest() != cfg.digest() and "global_pool" not in base.arch()
    assert method.arch()["global_pool"] == "avg"
    assert base.cfg.digest() == FinetuneConfig(**{**cfg.model_dump(), "global_pool": None}).digest()
    model = method.build_model()
    encoder = model.encoder if mode == "linear" else model
    ref, _ = load_export_model(str(tmp_path / "mae"))  # the MAE export as written: CLS-token pooling
    for name, value in ref.state_dict().items():  # every trained tensor loaded, the final norm where it was
        torch.testing.assert_close(encoder.state_dict()[name], value)
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        ref.eval(), encoder.eval()
        want = pool_features(ref, ref.forward_features(x), "avg")  # kind: eval's pool: avg
        assert not torch.allclose(want, pool_features(ref, ref.forward_features(x), "token"))
        torch.testing.assert_close(encoder.forward_head(encoder.forward_features(x), pre_logits=True), want)
        if mode == "linear":
            torch.testing.assert_close(model.features(x), want)
    train_a_few_steps(method, model)
    method.export(model, str(tmp_path / "export"), rank=0, storage_options={}, extra={})
    loaded, config = load_export_model(str(tmp_path / "export"))
    hub = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    assert config["global_pool"] == "avg" and config["model_args"]["fc_norm"] is False
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(x), model(x), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(hub(x), model(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="global_pool"):
        FinetuneConfig(name="ft", data="/x", init="pretrain", global_pool="max")


@pytest.mark.parametrize("mode", ["prompt", "adapter"])
def test_prompt_and_adapter_train_only_their_tensors_and_the_head_and_export_through_timm(tmp_path, local_shards,
                                                                                          mode):
    write_mae_export(str(tmp_path / "mae"))
    source = load_export_model(str(tmp_path / "mae"))[0].eval()
    cfg = FinetuneConfig(name="ft", data="/x", init="pretrain", mode=mode, num_classes=3,
                         **({"prompt": {"tokens": 4}} if mode == "prompt" else {"adapter": {"bottleneck": 8}}))
    method = set_up(cfg, local_shards, init=str(tmp_path / "mae"))
    model = method.build_model()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if mode == "prompt":
        assert trainable == {"reg_token", "head.weight", "head.bias"} and model.reg_token.shape == (1, 4, 64)
        pos = model.pos_embed.detach()  # [1, 1 + 4 + 64, D]: zero rows for the prompts, the init's others
        assert torch.equal(pos[:, 1:5], torch.zeros_like(pos[:, 1:5]))
        assert torch.equal(torch.cat([pos[:, :1], pos[:, 5:]], 1), source.pos_embed.detach())
    else:
        assert trainable == {f"blocks.{i}.adapter.{m}.{w}" for i in range(2) for m in ("down", "up")
                             for w in ("weight", "bias")} | {"head.weight", "head.bias"}
        x = torch.randn(4, 3, 32, 32)
        with torch.no_grad():  # the up-projection starts at zero: step 0 is the backbone
            assert torch.equal(model.eval().forward_features(x), source.forward_features(x))
    model.train()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = build_optimizer(model, cfg.optim, method.no_weight_decay(model), method.param_groups(model, cfg.optim))
    for step in range(3):
        batch = {"image": torch.randn(8, 3, 32, 32), "label": torch.randint(0, 3, (8,))}
        loss, _ = method.step(model, batch, step)
        loss.backward()
        assert {n for n, p in model.named_parameters() if p.grad is not None} == trainable
        optimizer.step()
        optimizer.zero_grad()
    names = {id(p): n for n, p in model.named_parameters()}
    assert {names[id(p)] for p in optimizer.state} == trainable  # no optimizer state for frozen tensors
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != (n in trainable), n  # the rest bit-identical, the trained moved

    method.export(model, str(tmp_path / "export"), rank=0, storage_options={}, extra={})
    loaded = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    assert (loaded.num_reg_tokens == 4) if mode == "prompt" else (type(loaded.blocks[0]).__name__ == "AdapterBlock")
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
        torch.testing.assert_close(load_export_model(str(tmp_path / "export"))[0].eval()(x), model(x), rtol=0, atol=0)


def test_prompt_and_adapter_settings_need_their_mode_and_prompts_need_a_backbone_without_registers(tmp_path,
                                                                                                  local_shards):
    with pytest.raises(ValueError, match="prompt settings are given but mode is 'full'"):
        FinetuneConfig(name="ft", data="/x", init="pretrain", prompt={"tokens": 4})
    with pytest.raises(ValueError, match="adapter settings are given but mode is 'lora'"):
        FinetuneConfig(name="ft", data="/x", init="pretrain", mode="lora", adapter={"scale": "learned"})
    cfg = FinetuneConfig(name="ft", data="/x", mode="prompt", num_classes=3,
                         model={"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "reg_tokens": 2})
    with pytest.raises(ValueError, match="already has 2 register tokens"):
        set_up(cfg, local_shards).build_model()


def test_lora_merge_is_w_plus_b_a_times_scaling():
    a, b, w = torch.randn(2, 5), torch.randn(4, 2), torch.randn(4, 5)
    state = {"x.base_layer.weight": w, "x.base_layer.bias": torch.ones(4), "x.lora_A.default.weight": a,
             "x.lora_B.default.weight": b, "y.weight": torch.zeros(1)}
    out = merge_lora_state(state, scaling=0.5)
    assert set(out) == {"x.weight", "x.bias", "y.weight"}
    torch.testing.assert_close(out["x.weight"], w + 0.5 * b @ a)


def test_layer_decay_scales_lr_from_head_down_to_embeddings():
    model = timm.create_model("vit_tiny_patch16_224", **{k: v for k, v in TINY_MODEL.items() if k != "arch"},
                              num_classes=3)
    groups = param_groups(model, 0.05, {"pos_embed", "cls_token"}, layer_decay=0.5)
    scale = {id(p): g["lr_scale"] for g in groups for p in g["params"]}
    wd = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert scale[id(model.head.weight)] == 1.0
    assert scale[id(model.blocks[1].attn.qkv.weight)] == 0.5
    assert scale[id(model.blocks[0].attn.qkv.weight)] == 0.25
    assert scale[id(model.patch_embed.proj.weight)] == scale[id(model.cls_token)] == 0.125
    assert wd[id(model.cls_token)] == 0.0 and wd[id(model.blocks[0].attn.qkv.bias)] == 0.0
    assert wd[id(model.blocks[0].attn.qkv.weight)] == 0.05


def test_full_mode_mixes_in_the_loader_and_the_step_mixes_the_targets_with_its_lambdas(local_shards):
    cfg = FinetuneConfig(name="ft", data="/x", model=TINY_MODEL, mode="full", num_classes=3, seed=4)
    targets = soft_targets(torch.tensor([0, 1, 2, 0, 1, 2]), 3, smoothing=0.1)
    assert torch.allclose(targets.sum(1), torch.ones(6)) and math.isclose(float(targets[0, 0]), 0.9 + 0.1 / 3,
                                                                         rel_tol=1e-6)
    method = set_up(cfg, local_shards)
    mix = method.train_mix()
    assert mix is not None and (mix.mixup, mix.cutmix, mix.seed) == (0.8, 1.0, 4)
    assert FinetuneMethod(FinetuneConfig(name="ft", data="/x", init="p", mode="linear")).train_mix() is None
    model = method.build_model().eval()  # eval: no drop path, so two forwards agree
    loader = StreamingLoader(local_shards, batch_size=8, seed=4, transform=method.train_transform(), mix=mix,
                             partial="drop")
    batch = next(iter(loader))
    lams = torch.tensor(batch["mix_lam"])
    assert (lams < 1).any() and ((lams > 0) & (lams <= 1)).all()
    loss, _ = method.step(model, batch, 0)
    mixed = soft_targets(batch["label"], 3, 0.1) * lams[:, None] + soft_targets(batch["partner_label"], 3, 0.1) * (
        1 - lams[:, None])
    assert torch.allclose(mixed.sum(1), torch.ones(8))
    want = torch.sum(-mixed * torch.log_softmax(model(batch["image"]).float(), -1), -1).mean()
    assert torch.allclose(loss, want, atol=1e-6)
    linear = FinetuneConfig(name="ft", data="/x", init="p", mode="linear")
    assert linear.mixup == 0 and linear.drop_path_rate == 0 and linear.label_smoothing == 0
    assert cfg.mixup == 0.8 and cfg.cutmix == 1.0 and cfg.layer_decay == 0.75


def test_spec_references_resolve_to_exports_and_dangling_ones_name_the_field():
    stages = [{"name": "pretrain", "kind": "mae", "data": "s3://b/shards", "model": TINY_MODEL},
              {"name": "probe", "kind": "finetune", "mode": "linear", "data": "s3://b/shards", "init": "pretrain"},
              {"name": "other", "kind": "finetune", "data": "s3://b/shards", "init": "s3://b/x/export"}]
    spec = parse_spec({"name": "r", "storage": "s3://b/runs", "stages": stages})
    assert spec.stage_job("probe", "ray")["init_url"] == "s3://b/runs/r/stages/pretrain/export"
    assert spec.stage_job("other", "ray")["init_url"] == "s3://b/x/export"
    assert "init_url" not in spec.stage_job("pretrain", "ray")
    with pytest.raises(SpecError, match=r"stages\[1\] \(probe\) > init: 'pretrian' is neither an earlier stage"):
        parse_spec({"name": "r", "storage": "/tmp/r", "stages": [stages[0], {**stages[1], "init": "pretrian"}]})
    with pytest.raises(SpecError, match=r"stages\[0\] \(probe\) > init: 'pretrain' is a later stage"):
        parse_spec({"name": "r", "storage": "/tmp/r", "stages": [stages[1], stages[0]]})
    prep = {"name": "data", "kind": "prep", "source": "./d"}
    with pytest.raises(SpecError, match=r"stages\[1\] \(probe\) > init: stage 'data' is a prep stage"):
        parse_spec({"name": "r", "storage": "/tmp/r", "stages": [prep, {**stages[1], "data": "data", "init": "data"}]})
    with pytest.raises(SpecError, match=r"stages\[0\] \(probe\) > mode"):
        parse_spec({"name": "r", "storage": "/tmp/r", "stages": [{**stages[1], "init": "/x", "mode": "partial"}]})


# ---- label fraction and random init -----------------------------------------------------------------


def test_label_fraction_is_a_stratified_seeded_subset_identical_on_every_rank_and_as_eval_draws_it(local_shards):
    labels = split_labels(local_shards, "train")
    assert labels.tolist() == [i % 3 for i in range(48)]  # write_shards labels sample i with i % 3

    def chosen(rank: int = 0, seed: int = 0, fraction: float = 0.25) -> FinetuneMethod:
        cfg = FinetuneConfig(name="ft", data="/x", model=TINY_MODEL, label_fraction=fraction, seed=seed)
        return set_up(cfg, local_shards, rank=rank, world=2)

    rank0, rank1 = chosen(0), chosen(1)
    ids = rank0.train_sample_ids()
    assert rank0.labeled_samples == len(ids) == 12 and np.bincount(labels[ids]).tolist() == [4, 4, 4]
    assert np.array_equal(ids, rank1.train_sample_ids()) and np.array_equal(ids, chosen(0).train_sample_ids())
    assert not np.array_equal(ids, chosen(0, seed=1).train_sample_ids())
    assert np.array_equal(ids, label_subset(labels, 0.25, seed=0).numpy())  # what `kind: eval` uses
    assert np.bincount(labels[chosen(fraction=0.1).train_sample_ids()]).tolist() == [2, 2, 2]  # round(1.6)
    everything = chosen(fraction=1.0)
    assert everything.train_sample_ids() is None and everything.labeled_samples == 48

    batch = {"image": torch.randn(4, 3, 32, 32), "label": torch.tensor([0, 1, 2, 0])}
    _, logged = rank0.step(rank0.build_model(), batch, 0)
    assert logged == {"label_fraction": 0.25, "labeled_samples": 12.0}


def test_loader_on_a_label_subset_serves_it_once_per_epoch_and_resumes_exactly_also_on_another_world_size(
        local_shards):
    labels = split_labels(local_shards, "train")
    ids = label_subset(labels, 0.25, seed=0).numpy()

    def loader(rank: int, world: int, subset=ids) -> StreamingLoader:
        return StreamingLoader(local_shards, batch_size=3, seed=0, rank=rank, world_size=world, subset=subset,
                               partial="drop")

    for epoch in (0, 1):
        served = []
        for rank in (0, 1):
            part = loader(rank, 2)
            part.set_epoch(epoch)
            for batch in part:
                assert batch["label"].tolist() == labels[batch["index"].numpy()].tolist()
                served += batch["index"].tolist()
        assert sorted(served) == ids.tolist(), epoch  # every chosen sample once, nothing else

    reference = [b["index"].tolist() for b in loader(0, 1)]
    first = loader(0, 1)
    taken = [b["index"].tolist() for _, b in zip(range(2), first)]  # range first: zip takes no 3rd batch
    resumed = loader(0, 1)
    resumed.load_state_dict(first.state_dict())
    assert taken + [b["index"].tolist() for b in resumed] == reference

    ranks = [loader(r, 2) for r in (0, 1)]
    consumed = [i for part in ranks for i in next(iter(part))["index"].tolist()]
    alone = loader(0, 1)  # the same subset on 1 worker: the rest of the epoch, exactly once
    alone.load_state_dict(ranks[0].state_dict())
    rest = [i for b in alone for i in b["index"].tolist()]
    assert sorted(consumed + rest) == ids.tolist()

    other = loader(0, 1, subset=label_subset(labels, 0.25, seed=1).numpy())
    with pytest.raises(ValueError, match="subset="):
        other.load_state_dict(first.state_dict())
    with pytest.raises(ValueError, match=r"sample id 48, outside \[0, 48\)"):
        loader(0, 1, subset=[0, 48])


def test_random_init_is_seeded_timm_init_of_model_and_exports_a_timm_classifier(tmp_path, local_shards):
    cfg = FinetuneConfig(name="scratch", data="/x", model=TINY_MODEL, mode="full", drop_path_rate=0.0)

    def built(seed: int) -> tuple[FinetuneMethod, torch.nn.Module]:
        torch.manual_seed(seed)  # what the engine does before building, with the stage's seed
        method = set_up(cfg, local_shards)
        return method, method.build_model()

    method, model = built(0)
    same, other = built(0)[1].state_dict(), built(1)[1].state_dict()
    assert all(torch.equal(v, same[k]) for k, v in model.state_dict().items())
    assert not torch.equal(model.state_dict()["blocks.0.attn.qkv.weight"], other["blocks.0.attn.qkv.weight"])
    assert model.num_classes == 3 and len(model.blocks) == TINY_MODEL["depth"]  # classes from the manifest
    assert method.arch()["init"] is None and method.arch()["model"]["arch"] == TINY_MODEL["arch"]

    train_a_few_steps(method, model)
    method.export(model, str(tmp_path / "export"), rank=0, storage_options={}, extra={})
    loaded = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True).eval()
    config = load_export_model(str(tmp_path / "export"))[1]
    assert config["vitforge"]["init"] == "random" and config["vitforge"]["labeled_samples"] == 48
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model.eval()(x))

    linear = set_up(FinetuneConfig(name="probe", data="/x", model=TINY_MODEL, mode="linear"), local_shards)
    probe = linear.build_model()  # a frozen random encoder: the random-features baseline
    assert {n for n, p in probe.named_parameters() if p.requires_grad} == {"head.weight", "head.bias"}


def test_finetune_spec_needs_exactly_one_of_init_and_model_and_a_fraction_in_0_1():
    data = "s3://b/shards"
    pretrain = {"name": "pretrain", "kind": "mae", "data": data, "model": TINY_MODEL}

    def spec(**stage):
        return parse_spec({"name": "r", "storage": "s3://b/runs",
                           "stages": [pretrain, {"name": "scratch", "kind": "finetune", "data": data, **stage}]})

    job = spec(model=TINY_MODEL, label_fraction=0.1).stage_job("scratch", "ray")
    assert "init_url" not in job and job["stage"]["model"]["arch"] == TINY_MODEL["arch"]
    assert job["stage"]["label_fraction"] == 0.1 and spec(init="pretrain").stage("scratch").label_fraction == 1.0
    with pytest.raises(SpecError, match=r"stages\[1\] \(scratch\).*give init .* or model"):
        spec()
    with pytest.raises(SpecError, match=r"stages\[1\] \(scratch\).*init \('pretrain'\) and model are both given"):
        spec(init="pretrain", model=TINY_MODEL)
    with pytest.raises(SpecError, match=r"model > drop_path_rate: set the stage's drop_path_rate"):
        spec(model={**TINY_MODEL, "drop_path_rate": 0.1})
    for bad in (0, 1.5):
        with pytest.raises(SpecError, match=r"stages\[1\] \(scratch\) > label_fraction"):
            spec(init="pretrain", label_fraction=bad)


# ---- on a 2-worker DeepSpeed gang --------------------------------------------------------------------


def finetune_spec(tmp_path, storage: str, data: str) -> str:
    common = {"kind": "finetune", "data": data, "init": "pretrain", "batch_size": 8, "loader_workers": 2,
              "checkpoint": {"every_steps": 2, "keep_last": 1}, "optim": {"base_lr": 5e-3}}
    stages = [{"name": "pretrain", "kind": "mae", "data": data, "model": TINY_MODEL, "decoder": TINY_DECODER},
              {**common, "name": "full", "mode": "full", "zero_stage": 3, "epochs": 2},
              {**common, "name": "linear", "mode": "linear", "zero_stage": 2, "max_steps": 3},
              {**common, "name": "lora", "mode": "lora", "zero_stage": 3, "max_steps": 3, "lora": {"r": 4}}]
    path = tmp_path / "finetune.yaml"
    path.write_text(yaml.safe_dump({"name": "ft", "storage": storage, "compute": {"workers": 2}, "stages": stages}))
    return str(path)


@pytest.fixture(scope="module")
def labeled_shards(s3, tmp_path_factory) -> str:
    from _shards_util import write_shards

    dest = f"s3://{s3.bucket}/finetune-shards-{tmp_path_factory.mktemp('x').name}"
    write_shards(dest, {"train": [24, 24], "val": [10]}, classes=3)
    return dest


# one gang per mode costs ~1 min each on 2 cores; every mode's maths is covered in-process above, so
# the default tier runs the full mode on a gang and the slow tier the other two
@pytest.mark.parametrize("mode", ["full", pytest.param("linear", marks=pytest.mark.slow),
                                  pytest.param("lora", marks=pytest.mark.slow)])
def test_gang_finetunes_an_earlier_stage_export_logs_val_top1_per_epoch_and_exports(labeled_shards, s3, tmp_path,
                                                                                      mode):
    storage = f"s3://{s3.bucket}/{tmp_path.name}"
    write_mae_export(f"{storage}/ft/stages/pretrain/export")
    spec = finetune_spec(tmp_path, storage, labeled_shards)
    rc, out = finish(torchrun(spec, mode))
    assert rc == 0, out[-4000:]
    assert status(storage, "ft", mode)["state"] == "done"
    records = metrics(storage, "ft", mode)
    evaluated = [r for r in records if "val_top1" in r]
    # 48 train samples / (2 workers x 8) = 3 steps an epoch: evaluated at each epoch end (and the last step)
    assert [r["step"] for r in evaluated] == ([3, 6] if mode == "full" else [3])
    for r in evaluated:
        assert r["val_count"] == 10 and 0 <= r["val_top1"] <= r["val_top5"] <= 1 and math.isfinite(r["val_loss"])
    if mode == "full":  # layer-wise lr decay reached the optimizer: the logged lr is the head's (scale 1)
        assert all(math.isfinite(r["loss"]) for r in records)
    export = stage_store(storage, "ft", mode).child("export")
    local = tmp_path / "export"
    for name in ("config.json", "model.safetensors"):
        export.get_file(name, str(local / name))
    model = timm.create_model(f"local-dir:{local}", pretrained=True).eval()
    assert model.num_classes == 3
    assert torch.isfinite(model(torch.randn(2, 3, 32, 32))).all()


@pytest.mark.slow  # one more torchrun gang (~30-90 s); the cheap tests above cover the pieces
def test_gang_trains_from_random_init_on_a_label_fraction_and_logs_the_labeled_count(labeled_shards, s3, tmp_path):
    storage = f"s3://{s3.bucket}/{tmp_path.name}"
    stage = {"name": "scratch", "kind": "finetune", "data": labeled_shards, "model": TINY_MODEL, "mode": "full",
             "label_fraction": 0.25, "epochs": 2, "batch_size": 3, "zero_stage": 2, "loader_workers": 0,
             "checkpoint": {"every_steps": 100, "keep_last": 1}, "optim": {"base_lr": 5e-3}}
    path = tmp_path / "scratch.yaml"
    path.write_text(yaml.safe_dump({"name": "ft", "storage": storage, "compute": {"workers": 2}, "stages": [stage]}))
    rc, out = finish(torchrun(str(path), "scratch"))
    assert rc == 0, out[-4000:]
    assert status(storage, "ft", "scratch")["state"] == "done"
    records = metrics(storage, "ft", "scratch")
    # 12 of 48 labels (4 per class) / (2 workers x 3) = 2 steps an epoch; all 48 would give 8
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(r["labeled_samples"] == 12 and r["label_fraction"] == 0.25 for r in records)
    assert [r["step"] for r in records if "val_top1" in r] == [2, 4]
    config = stage_store(storage, "ft", "scratch").child("export").get_json("config.json")
    assert config["vitforge"]["init"] == "random" and config["vitforge"]["labeled_samples"] == 12
    assert config["num_classes"] == 3 and config["model_args"]["depth"] == TINY_MODEL["depth"]
