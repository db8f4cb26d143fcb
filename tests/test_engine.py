"""The engine's pure pieces (schedules, the DeepSpeed config) — single process, no gang.

Moved from test_mae.py: they test ``jobs/engine.py``, not MAE (an MAE config is just a stage config).
"""

from __future__ import annotations

import pytest

from jobs.engine import OptimConfig, deepspeed_config, lr_at
from jobs.mae import MAEConfig

TINY_MODEL = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 64,
              "num_heads": 4}
TINY_DECODER = {"embed_dim": 32, "depth": 1, "num_heads": 4}


def tiny_cfg(**over) -> MAEConfig:
    return MAEConfig(**{"name": "pretrain", "data": "/x", "model": TINY_MODEL, "decoder": TINY_DECODER, **over})


def test_lr_schedule_is_warmup_then_cosine_of_the_step():
    assert lr_at(0, 100, 10, 1.0) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(10, 100, 10, 1.0) == pytest.approx(1.0)
    assert lr_at(55, 100, 10, 1.0) == pytest.approx(0.5)
    assert lr_at(100, 100, 10, 1.0, floor=0.1) == pytest.approx(0.1)


def test_deepspeed_mapping_in_a_stage_is_merged_over_ours():
    cfg = tiny_cfg(zero_stage=3, offload_optimizer=True, optim=OptimConfig(clip_grad=1.0),
                   deepspeed={"zero_optimization": {"reduce_bucket_size": 1000}, "bf16": {"enabled": True}})
    ds = deepspeed_config(cfg, world_size=4, on_gpu=False)
    assert ds["zero_optimization"]["stage"] == 3 and ds["zero_optimization"]["reduce_bucket_size"] == 1000
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and ds["gradient_clipping"] == 1.0 and ds["train_batch_size"] == 64 * 4


# ---- one collective per step, timed checkpoints included (2 gloo ranks) --------------------------------


def _count_collectives(rank: int, port: int, url: str, out_dir: str) -> None:
    """Each rank: the engine's per-step agreement and checkpoint decision under every_minutes, with every
    torch.distributed collective counted; rank 0's clock says "due" at step 1, only rank 1's at step 2."""
    import json
    import os
    import types

    import torch
    import torch.distributed as dist

    from jobs._engine_loop import _all_agree
    from jobs.checkpoint import CheckpointManager, CheckpointPolicy

    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}")
    ckpt = CheckpointManager(url, CheckpointPolicy(every_minutes=60), rank=rank, world_size=2)
    calls: list[str] = []
    for name in ("all_reduce", "broadcast", "broadcast_object_list", "all_gather", "all_gather_object", "barrier",
                 "reduce", "gather", "scatter"):
        def counted(*args, _fn=getattr(dist, name), _name=name, **kwargs):
            calls.append(_name)
            return _fn(*args, **kwargs)
        setattr(dist, name, counted)
    run = types.SimpleNamespace(ctx=types.SimpleNamespace(rank=rank, world_size=2), ckpt=ckpt, losses=[],
                                accelerator=types.SimpleNamespace(device=torch.device("cpu")))
    steps = []
    for step, late_rank in ((1, 0), (2, 1)):
        ckpt.schedule.last_time = ckpt.schedule.clock() - (7200 if rank == late_rank else 0)
        before = len(calls)
        stop, time_due = _all_agree(run, torch.tensor(1.0 + rank), stop_requested=False)
        due = ckpt.due(step, time_flag=time_due)
        steps.append({"calls": calls[before:], "due": due, "stop": stop, "loss": run.losses[-1]})
    before = len(calls)
    ckpt.due(3)  # without the agreed flag the manager must broadcast rank 0's clock: the counting sees it
    result = {"steps": steps, "unagreed": calls[before:]}
    with open(os.path.join(out_dir, f"rank-{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.destroy_process_group()


def test_a_step_with_timed_checkpoints_costs_one_collective_and_follows_rank_0s_clock(tmp_path):
    import json

    import torch.multiprocessing as mp

    from cluster.localstore import free_ports

    mp.spawn(_count_collectives, args=(free_ports(1)[0], f"file://{tmp_path}/stage", str(tmp_path)), nprocs=2,
             join=True)
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(2)]
    for rank, rec in enumerate(ranks):
        assert [s["calls"] for s in rec["steps"]] == [["all_reduce"], ["all_reduce"]], rank
        assert [s["due"] for s in rec["steps"]] == [True, False], rank  # rank 0's clock decides for both
        assert [s["loss"] for s in rec["steps"]] == [1.5, 1.5] and not any(s["stop"] for s in rec["steps"])
        assert rec["unagreed"] == ["broadcast"]


# ---- AdamW groups: one no-decay rule, layer decay included ---------------------------------------------


def _named(model, groups) -> list[tuple[float, float, list[str]]]:
    names = {id(p): n for n, p in model.named_parameters()}
    return [(g.get("lr_scale", 1.0), g["weight_decay"], [names[id(p)] for p in g["params"]]) for g in groups]


def test_layer_decay_groups_of_the_finetune_recipe_are_those_it_always_had():
    """The groups (members, order, decay, scale) fine-tuning had before layer decay moved into the engine;
    a change here changes a checkpoint's optimizer layout and every fine-tune's result."""
    import timm

    from jobs.engine import param_groups
    from jobs.finetune import FinetuneConfig, FinetuneMethod

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, embed_dim=32, num_heads=2,
                              num_classes=5, reg_tokens=2)
    method = FinetuneMethod(FinetuneConfig(name="ft", data="/x", model={"arch": "vit_tiny_patch16_224", "img_size": 32}))
    groups = param_groups(model, 0.05, method.no_weight_decay(model), method.layer_decay())
    block = lambda i, kind: [f"blocks.{i}.{n}" for n in (  # noqa: E731
        ("norm1.weight", "norm1.bias", "attn.qkv.bias", "attn.proj.bias", "norm2.weight", "norm2.bias",
         "mlp.fc1.bias", "mlp.fc2.bias") if kind == "no_decay" else
        ("attn.qkv.weight", "attn.proj.weight", "mlp.fc1.weight", "mlp.fc2.weight"))]
    assert _named(model, groups) == [
        (0.421875, 0.0, ["cls_token", "reg_token", "pos_embed", "patch_embed.proj.bias"]),
        (0.421875, 0.05, ["patch_embed.proj.weight"]),
        (0.5625, 0.0, block(0, "no_decay")), (0.5625, 0.05, block(0, "decay")),
        (0.75, 0.0, block(1, "no_decay")), (0.75, 0.05, block(1, "decay")),
        (1.0, 0.0, ["norm.weight", "norm.bias", "head.bias"]), (1.0, 0.05, ["head.weight"])]
    plain = param_groups(model, 0.05, method.no_weight_decay(model))  # no layer decay: decayed, then the rest
    assert [(wd, len(names)) for _, wd, names in _named(model, plain)] == [(0.05, 10), (0.0, 23)]


def test_a_partial_optim_changes_only_the_fields_it_names_in_every_method():
    """One rule for every method: ``optim: {base_lr: …}`` keeps the rest of the method's own recipe
    (fine-tuning's betas (0.9, 0.999) used to fall back to the generic (0.9, 0.95))."""
    import jobs.methods  # noqa: F401  registers the built-in kinds
    from jobs.method import config_classes

    needs = {"finetune": {"init": "pretrain"},
             "distill": {"teacher": "pretrain", "model": {"arch": "vit_tiny_patch16_224", "img_size": 32}}}
    kinds = []
    for cls in config_classes():
        kind = cls.model_fields["kind"].default
        base = {"name": "s", "data": "/x", **needs.get(kind, {})}
        default = cls.model_validate(base).optim
        got = cls.model_validate({**base, "optim": {"base_lr": 0.123, "warmup_steps": 3}}).optim
        assert got == default.model_copy(update={"base_lr": 0.123, "warmup_steps": 3}), kind
        kinds.append((kind, default.betas))
    assert ("finetune", (0.9, 0.999)) in kinds and ("dino", (0.9, 0.999)) in kinds and ("mae", (0.9, 0.95)) in kinds
