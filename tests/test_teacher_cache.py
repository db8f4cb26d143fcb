"""Cached teacher outputs: a teacher_outputs cache of the digits replays the online teacher's targets.

Default tier, in one process: the cache's units are computed as the stage's Ray tasks compute them
(``run_units``), the student's loader is the engine's (same seed, transform, ``partial="drop"``).
With k = every class the cached distillation's loss equals the online one step for step within
the fp16 bound stated in :func:`fp16_bound`; on another world size each rank reads its own entries;
a cache of another crop scale (or temperature, data, teacher) is refused naming what differs.
"""

from __future__ import annotations

import numpy as np
import pytest
import timm
import torch
from safetensors.torch import save_file

from _train_util import write_digit_shards
from dataprep.loader import StreamingLoader
from dataprep.transforms import mae_transform
from jobs._cache_codec import decode_unit, encode_unit
from jobs._cache_reader import CacheMismatchError, soft_targets
from jobs.distill import DistillConfig, DistillMethod
from jobs.engine import StageContext
from jobs.teacher_cache import (TeacherOutputsConfig, all_units, data_digest, run_units, unit_name,
                                write_manifest)
from cluster.storage import Store
from pipeline.spec import SpecError, parse_spec

STUDENT = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 32,
           "num_heads": 2}
TEACHER_ARGS = {"channels": [8, 16, 32, 64], "stem_width": 8}
T = 2.0


def write_teacher(path: str) -> dict:
    """A 10-class CNN teacher whose outputs are peaked and depend on the crop (a scaled random head)."""
    torch.manual_seed(0)
    teacher = timm.create_model("resnet18", num_classes=10, **TEACHER_ARGS)
    with torch.no_grad():
        teacher.fc.weight.mul_(40.0)
    save_file(teacher.state_dict(), path)
    return {"arch": "resnet18", "weights": path, "num_classes": 10, "args": TEACHER_ARGS}


def make_cache(tmp_path, data_url: str, teacher: dict, **over) -> str:
    """Every unit of a teacher_outputs stage, computed and committed, then its manifest; returns the cache URL."""
    cfg = TeacherOutputsConfig(**{"name": "targets", "data": "data", "teacher": teacher, "epochs": 2, "topk": 10,
                                  "temperature": T, "img_size": 32, "crop_scale": (0.35, 1.0), "seed": 3,
                                  "batch_size": 32, **over})
    url = str(tmp_path / f"cache-{cfg.digest()[:8]}")
    dig = data_digest(data_url)
    job = {"stage": cfg.model_dump(mode="json"), "cache_url": url, "data_url": data_url, "data_digest": dig}
    units = all_units(cfg, data_url, {})
    run_units(job, units)
    write_manifest(cfg, Store(url), units, data_url, {}, dig)
    return url


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    root = tmp_path_factory.mktemp("tc")
    data_url = write_digit_shards(str(root / "data"), images=96, per_shard=32)
    teacher = write_teacher(str(root / "teacher.safetensors"))
    return root, data_url, teacher, make_cache(root, data_url, teacher)


def student(data_url: str, cache_url: str | None, online_teacher: dict | None, **over) -> DistillMethod:
    """A distill method (online with ``teacher``, else cached from ``cache_url``), set up on the digits."""
    targets = {"targets": "cached", "cache": "targets"} if cache_url else {"teacher": online_teacher}
    fields = {"name": "s", "data": "data", "model": STUDENT, "crop_scale": (0.35, 1.0), "seed": 3,
              "loss": {"temperature": T}, **targets, **over}
    method = DistillMethod(DistillConfig(**fields))
    method.setup(StageContext(stage_url="/unused", data_url=data_url, refs={"cache": cache_url} if cache_url else {}))
    return method


def loader(method: DistillMethod, data_url: str, rank: int = 0, world: int = 1) -> StreamingLoader:
    """The engine's train loader of ``method``."""
    return StreamingLoader(data_url, batch_size=16, seed=method.cfg.seed, rank=rank, world_size=world,
                           transform=method.train_transform(), partial="drop", mix=method.train_mix())


def fp16_bound(method: DistillMethod, model, batch) -> float:
    """The loss difference fp16 log-probabilities allow: each stored log-prob l has |dl| <= 2**-11 |l|,
    so |dKL| <= T**2 * mean_n sum_c p_c |dl_c| (1 + |l_c - log q_c|) (first order; x1.5 for the rest)."""
    with torch.no_grad():
        lp = torch.log_softmax(method._teacher_targets(batch["image"])["logits"] / T, -1)
        lq = torch.log_softmax(model(batch["image"], None)["logits"] / T, -1)
        per = (lp.exp() * lp.abs() * 2.0 ** -11 * (1 + (lp - lq).abs())).sum(-1)
    return 1.5 * T * T * float(per.mean()) + 1e-6


def test_cached_losses_equal_online_losses_step_for_step_with_k_all_classes(digits):
    _, data_url, teacher, cache_url = digits
    assert_cached_equals_online(data_url, teacher, cache_url)


MIX = {"mixup": 0.8, "cutmix": 1.0, "mix_prob": 0.9}


def test_with_mixup_and_cutmix_cached_losses_equal_online_losses_and_a_cache_without_them_is_refused(digits):
    root, data_url, teacher, cache_url = digits
    with pytest.raises(CacheMismatchError, match=r"recipe.mix: cache None, student \{'mixup': 0.8"):
        student(data_url, cache_url, None, **MIX)
    mixed = make_cache(root, data_url, teacher, epochs=1, **MIX)
    with pytest.raises(CacheMismatchError, match=r"recipe.mix: cache \{'cutmix': 1.0, 'mixup': 0.8.*student None"):
        student(data_url, mixed, None)
    assert_cached_equals_online(data_url, teacher, mixed, epochs=1, **MIX)


def assert_cached_equals_online(data_url: str, teacher: dict, cache_url: str, epochs: int = 2, **over) -> None:
    """``epochs`` epochs of SGD on one student from the same init, online and cached: equal losses within the fp16
    bound at every step (with ``over``'s mixing: the batches are mixed, and equal on both sides)."""
    online, cached = student(data_url, None, teacher, **over), student(data_url, cache_url, None, **over)
    assert cached.teacher is None and cached.num_classes == 10
    models = []
    for m in (online, cached):
        torch.manual_seed(0)
        models.append(m.build_model())
    opts = [torch.optim.SGD(mod.parameters(), lr=0.05) for mod in models]
    steps = 0
    for epoch in range(epochs):
        streams = []
        for m in (online, cached):
            ld = loader(m, data_url)
            ld.set_epoch(epoch)
            streams.append(iter(ld))
        for b_on, b_ca in zip(*streams):
            assert torch.equal(b_on["index"], b_ca["index"]) and b_ca["epoch"] == epoch
            assert torch.equal(b_on["image"], b_ca["image"]) and ("mix_lam" in b_on) == bool(over)
            bound = fp16_bound(online, models[0], b_on)
            l_on, _ = online.step(models[0], b_on, steps)
            l_ca, _ = cached.step(models[1], b_ca, steps)
            assert abs(float(l_on) - float(l_ca)) <= bound, (steps, float(l_on), float(l_ca), bound)
            for loss, opt in zip((l_on, l_ca), opts):
                loss.backward()
                opt.step()
                opt.zero_grad()
            steps += 1
    assert steps == epochs * (96 // 16)
    assert float(l_on) > 0.01  # the teacher's targets are far from what the student predicts


def test_another_world_size_reads_each_ranks_own_entries(digits):
    """Rank 1 of 2 (epoch 1): its cached soft targets are the online teacher's for its own crops."""
    _, data_url, teacher, cache_url = digits
    online, cached = student(data_url, None, teacher), student(data_url, cache_url, None)
    ld = loader(online, data_url, rank=1, world=2)
    ld.set_epoch(1)
    for batch in ld:
        want = torch.softmax(online._teacher_targets(batch["image"])["logits"] / T, -1)
        got = cached.cache.lookup(batch["epoch"], batch["index"])
        probs = soft_targets(got["logprobs"], got.get("indices"), 10)
        assert torch.allclose(probs, want, atol=2e-3), (probs - want).abs().max()


def test_top3_soft_targets_keep_the_top_classes_and_spread_the_rest(digits):
    root, data_url, teacher, _ = digits
    url = make_cache(root, data_url, teacher, topk=3)
    cached = student(data_url, url, None)
    got = cached.cache.lookup(0, torch.arange(40))
    assert got["indices"].dtype == torch.int64 and got["logprobs"].shape == (40, 3)
    probs = soft_targets(got["logprobs"], got["indices"], 10)
    assert torch.allclose(probs.sum(-1), torch.ones(40), atol=1e-3)
    top = got["logprobs"].exp()
    rest = (1 - top.sum(-1, keepdim=True)).clamp_min(0) / 7
    mask = torch.ones(40, 10, dtype=torch.bool).scatter_(-1, got["indices"], False)
    assert torch.allclose(probs[mask].view(40, 7), rest.expand(-1, 7))
    manifest = cached.cache.manifest
    assert manifest["dtypes"] == {"logprobs": "float16", "indices": "uint8"} and manifest["format"] == 2
    per_logit = manifest["bytes"] / (96 * 2 * 3)
    assert per_logit < 3.0 + 1200 / (32 * 3)  # under 2 B value + 1 B index, plus the npz header of each unit


def test_the_unit_codec_is_lossless_and_delta_codes_sorted_indices():
    rng = np.random.default_rng(0)
    lp = np.log(rng.dirichlet(np.full(1000, 0.05), size=64)).astype(np.float16)
    idx = np.argsort(-lp.astype(np.float32), 1)[:, :100].astype(np.int16)
    top = np.take_along_axis(lp, idx.astype(np.int64), 1)
    feat = rng.normal(size=(64, 16)).astype(np.float16)
    blob = encode_unit({"logprobs": top, "indices": idx, "feature": feat})
    got = decode_unit(blob)
    assert got["indices"].dtype == np.int16 and (np.diff(got["indices"], axis=1) > 0).all()  # class order
    order = np.argsort(idx, 1)
    assert np.array_equal(got["indices"], np.take_along_axis(idx, order, 1))
    assert np.array_equal(got["logprobs"].view(np.uint16), np.take_along_axis(top, order, 1).view(np.uint16))
    assert np.array_equal(got["feature"].view(np.uint16), feat.view(np.uint16))
    assert len(blob) < 64 * (100 * 2.5 + 16 * 2)  # raw: 4 B per logit


def test_a_cache_of_another_crop_scale_or_temperature_is_refused_naming_it(digits):
    _, data_url, teacher, cache_url = digits
    with pytest.raises(CacheMismatchError, match=r"recipe.crop_scale: cache \[0.35, 1.0\], student \[0.2, 1.0\]"):
        student(data_url, cache_url, None, crop_scale=(0.2, 1.0))
    with pytest.raises(CacheMismatchError, match="temperature: cache 2.0, student 4.0"):
        student(data_url, cache_url, None, loss={"temperature": 4.0})
    with pytest.raises(CacheMismatchError, match="teacher: cache"):
        student(data_url, cache_url, None, teacher="another-stage")
    with pytest.raises(CacheMismatchError, match=r"epoch 2 is not in the cache .* \(epochs \[0, 2\)\)"):
        student(data_url, cache_url, None).cache.lookup(2, torch.arange(3))


def test_the_spec_refuses_a_cache_stage_of_another_recipe_naming_what_differs(tmp_path):
    def spec(**student_over):
        return {"name": "r", "storage": str(tmp_path), "stages": [
            {"name": "data", "kind": "prep", "source": str(tmp_path)},
            {"name": "targets", "kind": "teacher_outputs", "data": "data", "epochs": 2, "img_size": 32,
             "teacher": {"arch": "resnet18", "weights": "/t.safetensors", "num_classes": 10}},
            {"name": "s", "kind": "distill", "data": "data", "targets": "cached", "cache": "targets",
             "model": STUDENT, "epochs": 2, **student_over}]}
    parsed = parse_spec(spec(crop_scale=[0.2, 1.0], loss={"temperature": 1.0}))
    assert parsed.stage_job("s", "ray")["cache_url"].endswith("/r/stages/targets/cache")
    with pytest.raises(SpecError, match=r"recipe.crop_scale: cache \[0.2, 1.0\], student \[0.5, 1.0\]"):
        parse_spec(spec(crop_scale=[0.5, 1.0], loss={"temperature": 1.0}))
    with pytest.raises(SpecError, match=r"epochs: cache \[0, 2\), student \[0, 3\)"):
        parse_spec(spec(epochs=3, loss={"temperature": 1.0}))
    with pytest.raises(SpecError, match="targets: cached needs cache"):
        parse_spec(spec(cache=None))


def test_units_are_committed_by_their_record_and_never_redone(digits, tmp_path):
    root, data_url, teacher, cache_url = digits
    store = Store(cache_url)
    name = unit_name(1, 2)
    before = store.fs.info(store.path(f"units/{name}.npz"))["mtime"]
    cfg = TeacherOutputsConfig(name="targets", data="data", teacher=teacher, epochs=2, topk=10, temperature=T,
                               img_size=32, crop_scale=(0.35, 1.0), seed=3, batch_size=32)
    job = {"stage": cfg.model_dump(mode="json"), "cache_url": cache_url, "data_url": data_url,
           "data_digest": data_digest(data_url)}
    assert run_units(job, [(1, 2)]) == []  # committed: skipped
    assert store.fs.info(store.path(f"units/{name}.npz"))["mtime"] == before
    z = decode_unit(store.get_bytes(f"units/{name}.npz"))
    assert z["logprobs"].dtype == np.float16 and "indices" not in z  # k = C: no indices
    total = np.exp(z["logprobs"].astype(np.float32)).sum(1)
    assert np.allclose(total, 1.0, atol=1e-2)


def cache_spec(tmp_path, data_url: str, teacher: dict, max_failures: int) -> object:
    """A run whose teacher_outputs stage reads ``data_url`` on 2 Ray tasks."""
    return parse_spec({"name": "tc", "storage": str(tmp_path / "runs"),
                       "compute": {"workers": 2, "cpus_per_worker": 1, "max_failures": max_failures},
                       "stages": [{"name": "targets", "kind": "teacher_outputs", "data": data_url, "teacher": teacher,
                                   "epochs": 2, "topk": 3, "img_size": 32, "crop_scale": [0.35, 1.0], "seed": 3,
                                   "batch_size": 32}]})


def unit_files(url: str) -> dict[str, tuple[float, bytes]]:
    store = Store(url)
    return {n: (store.fs.info(store.path(f"units/{n}"))["mtime"], store.get_bytes(f"units/{n}"))
            for n in sorted(store.ls("units"))}


@pytest.mark.slow
def test_a_cache_stage_killed_by_sigkill_resumes_without_redoing_a_unit(digits, tmp_path, ray_local):
    """Each task SIGKILLs itself after its first commit (no retries): the stage fails with 2 of 6 units
    committed; the rerun computes only the other 4, and the cache equals an uninterrupted run's."""
    from cluster.gang import GangFailedError
    from jobs.layout import StageStatus
    from pipeline.run import run_teacher_outputs_stage

    _, data_url, teacher, _ = digits
    spec = cache_spec(tmp_path / "killed", data_url, teacher, max_failures=0)
    cache = spec.layout.stage("targets").cache
    with pytest.raises(GangFailedError):
        run_teacher_outputs_stage(spec, "targets", fault={"kill_after_units": 1})
    killed = unit_files(cache)
    assert len([n for n in killed if n.endswith(".json")]) == 2 and not Store(cache).exists("manifest.json")
    assert StageStatus(spec.stage_url("targets")).read()["state"] == "failed"

    assert run_teacher_outputs_stage(spec, "targets") == "done"
    status = StageStatus(spec.stage_url("targets")).read()
    assert status["state"] == "done" and status["computed_units"] == 4 and status["units"] == 6
    after = unit_files(cache)
    assert all(after[n] == killed[n] for n in killed)  # same mtime, same bytes: not redone

    clean = cache_spec(tmp_path / "clean", data_url, teacher, max_failures=0)
    assert run_teacher_outputs_stage(clean, "targets") == "done"
    assert {n: b for n, (_, b) in unit_files(clean.layout.stage("targets").cache).items()} == \
        {n: b for n, (_, b) in after.items()}
    manifest = Store(cache).get_json("manifest.json")
    assert manifest == Store(clean.layout.stage("targets").cache).get_json("manifest.json")
    assert manifest["epochs"] == [0, 2] and manifest["topk"] == 3 and manifest["samples"] == 96


def digit_tensors(start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn digits ``start:stop`` as the shards hold them (32 px RGB, bicubic), normalised: held-out val."""
    from PIL import Image
    from sklearn.datasets import load_digits

    from dataprep.transforms import eval_transform

    digits, transform = load_digits(), eval_transform(32, crop_fraction=1.0)
    imgs = [transform(Image.fromarray((digits.images[i] * (255.0 / 16.0)).astype(np.uint8), "L")
                      .resize((32, 32), Image.BICUBIC).convert("RGB")) for i in range(start, stop)]
    return torch.stack(imgs), torch.as_tensor(digits.target[start:stop])


def train_teacher(path: str, data_url: str, epochs: int) -> tuple[dict, torch.nn.Module]:
    """A resnet18 (tiny widths) trained on the digits' train shards; saved as ``{arch, weights}``."""
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10, **TEACHER_ARGS)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ld = StreamingLoader(data_url, batch_size=32, seed=1, transform=mae_transform(32, scale=(0.35, 1.0)),
                         partial="drop")
    for epoch in range(epochs):
        ld.set_epoch(epoch)
        for batch in ld:
            torch.nn.functional.cross_entropy(model(batch["image"]), batch["label"]).backward()
            opt.step()
            opt.zero_grad()
    save_file(model.state_dict(), path)
    return {"arch": "resnet18", "weights": path, "num_classes": 10, "args": TEACHER_ARGS}, model.eval()


def distil(method: DistillMethod, data_url: str, epochs: int) -> torch.nn.Module:
    """``epochs`` epochs of AdamW on ``method``'s student (seeded init), as the engine's loop feeds it."""
    torch.manual_seed(0)
    model = method.build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    ld = StreamingLoader(data_url, batch_size=32, seed=method.cfg.seed, transform=method.train_transform(),
                         partial="drop")
    for epoch in range(epochs):
        ld.set_epoch(epoch)
        for batch in ld:
            method.step(model, batch, 0)[0].backward()
            opt.step()
            opt.zero_grad()
    return model.eval()


SMALL_CNN = {"arch": "resnet18", "img_size": 32, "args": {"channels": [8, 16, 32, 32], "stem_width": 8}}


@pytest.fixture
def one_thread():
    """One torch thread (on a shared machine more threads only contend); restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.slow
def test_a_top3_cached_student_reaches_the_online_students_accuracy_within_the_margin(tmp_path, one_thread):
    """A trained teacher, k = 3 of 10 classes, 8 epochs of a small CNN student: the cached student's
    held-out top-1 (497 digits never trained on) stays within 0.06 of the online student's.
    Measured (2-core VM, seed 0): teacher 0.875, online 0.807, cached 0.785 (difference 0.022)."""
    data_url = write_digit_shards(str(tmp_path / "data"), images=640, per_shard=128)
    teacher, t_model = train_teacher(str(tmp_path / "teacher.safetensors"), data_url, epochs=14)
    cache_url = make_cache(tmp_path, data_url, teacher, topk=3, epochs=8)
    val_x, val_y = digit_tensors(1300, 1797)
    online = distil(student(data_url, None, teacher, model=SMALL_CNN), data_url, 8)
    cached = distil(student(data_url, cache_url, None, model=SMALL_CNN), data_url, 8)
    with torch.no_grad():
        acc = {"teacher": float(t_model(val_x).argmax(-1).eq(val_y).float().mean())}
        for name, model in (("online", online), ("cached", cached)):
            acc[name] = float(model(val_x, None)["logits"].argmax(-1).eq(val_y).float().mean())
    print("held-out top-1", acc)
    assert acc["teacher"] > 0.8 and acc["online"] > 0.7, acc
    assert abs(acc["cached"] - acc["online"]) <= 0.06, acc
