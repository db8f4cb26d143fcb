"""``eval``'s ``dense:`` section: patch labels by majority vote, mIoU, high-norm tokens, and a real eval job."""

from __future__ import annotations

import pytest
import torch

from _shapes import write_shapes
from jobs._eval_dense import high_norm_tokens, majority_patch_labels, miou
from jobs.evaluate import format_table, run_eval
from jobs.export import export_encoder
from jobs.models import ModelConfig, build_encoder
from pipeline.spec import parse_spec

TINY = {"arch": "vit_tiny_patch16_224", "img_size": 32, "patch_size": 4, "depth": 2, "embed_dim": 32, "num_heads": 2}


def test_patch_labels_are_the_majority_class_of_each_patch_with_ties_to_the_smaller_class():
    m = torch.zeros(1, 4, 4, dtype=torch.long)
    m[0, 0, :2] = 3  # top-left 2x2 patch: two 3s, two 0s -> tie -> 0
    m[0, 2:, 2:] = 2
    m[0, 3, 3] = 1  # bottom-right: three 2s, one 1 -> 2
    m[0, :2, 2:] = 1  # top-right: all 1
    assert majority_patch_labels(m, 2).tolist() == [[0, 1, 0, 2]]


def test_ignored_pixels_do_not_vote_and_a_patch_of_nothing_else_is_ignored():
    m = torch.full((1, 4, 4), 255, dtype=torch.long)
    m[0, 0, 0] = 2  # top-left: one 2 among three voids -> 2
    m[0, 0, 2:] = 1  # top-right: two 1s, two voids -> 1
    m[0, 2, 2], m[0, 3, 3] = 3, 0  # bottom-right: one 3, one 0 -> a tie -> 0
    assert majority_patch_labels(m, 2, ignore=255).tolist() == [[2, 1, 255, 0]]  # bottom-left: all void
    assert majority_patch_labels(m, 2).tolist() == [[255, 1, 255, 255]]  # without ignore: 255 is a class


def test_miou_skips_classes_absent_from_prediction_and_target():
    target = torch.tensor([0, 0, 1, 1, 2])
    pred = torch.tensor([0, 1, 1, 1, 2])
    mean, per_class = miou(pred, target, 4)
    assert per_class == [0.5, 2 / 3, 1.0, None] and mean == pytest.approx((0.5 + 2 / 3 + 1.0) / 3)


def test_high_norm_tokens_counts_those_above_factor_times_the_median():
    tokens = torch.ones(2, 10, 4)  # norm 2 everywhere
    tokens[0, 3] *= 10  # norm 20 > 4 x 2
    tokens[1, 7] *= 5  # norm 10 > 8
    tokens[1, 8] *= 3  # norm 6 < 8
    got = high_norm_tokens(tokens, 4.0)
    assert (got["count"], got["tokens"], got["median_norm"], got["threshold"]) == (2, 20, 2.0, 8.0)


def test_eval_dense_reports_patch_miou_and_high_norm_tokens_per_model_with_and_without_registers(tmp_path,
                                                                                                 ray_local):
    from dataprep.prep import PrepOptions, run_prep

    images, masks = write_shapes(str(tmp_path / "shapes"), count=60, size=32, seed=0)
    data = str(tmp_path / "data")
    run_prep(images, data, PrepOptions(format="png", masks=masks, val_fraction=0.25, shard_size=32), progress=False)
    urls = []
    for name, regs in (("plain", 0), ("regs", 2)):
        torch.manual_seed(0)
        cfg = ModelConfig(**TINY, reg_tokens=regs)
        export_encoder(build_encoder(cfg), cfg, str(tmp_path / name))
        urls.append(str(tmp_path / name))
    stage = {"name": "report", "kind": "eval", "data": data, "models": urls, "loader_workers": 0,
             "batch_size": 16, "probe": {"epochs": 5}, "dense": {}}
    spec = parse_spec({"name": "dense", "storage": str(tmp_path / "runs"), "stages": [stage]})
    report = run_eval(spec.eval_job("report"))
    for url in urls:
        d = report["models"][url]["dense"]
        assert d["classes"] == 4 and d["val_tokens"] == 15 * 64 and d["train_tokens"] == 45 * 64
        assert 0.0 < d["miou"] <= 1.0 and len(d["iou_per_class"]) == 4
        hn = d["high_norm"]
        assert hn["tokens"] == 15 * 64 and 0 <= hn["count"] <= hn["tokens"] and hn["threshold"] > hn["median_norm"]
        print(f"{url}: patch mIoU {d['miou']:.3f}, high-norm tokens {hn['count']} / {hn['tokens']}")
    assert "patch mIoU" in format_table(report)
    again = run_eval({**spec.eval_job("report"), "stage_url": str(tmp_path / "again")})
    assert again["models"][urls[0]]["dense"]["miou"] == report["models"][urls[0]]["dense"]["miou"]


def test_eval_dense_leaves_void_pixels_out_with_ignore_index(tmp_path, ray_local):
    """VOC-style masks: the top 4 rows of every mask are void (255). With ``ignore_index: 255`` the top
    row of patches is in neither the probe nor the scores and 255 is no class; without it, it is one."""
    import glob

    import numpy as np
    from PIL import Image

    from dataprep.prep import PrepOptions, run_prep

    images, masks = write_shapes(str(tmp_path / "shapes"), count=40, size=32, seed=2)
    for path in glob.glob(f"{masks}/*/*.png"):
        m = np.asarray(Image.open(path)).copy()
        m[:4] = 255
        Image.fromarray(m).save(path)
    data = str(tmp_path / "data")
    run_prep(images, data, PrepOptions(format="png", masks=masks, val_fraction=0.25, shard_size=32), progress=False)
    torch.manual_seed(0)
    url = str(tmp_path / "enc")
    export_encoder(build_encoder(ModelConfig(**TINY)), ModelConfig(**TINY), url)
    got = {}
    for ignore in (255, None):
        stage = {"name": "report", "kind": "eval", "data": data, "models": [url], "loader_workers": 0,
                 "batch_size": 16, "probe": {"epochs": 1}, "dense": {"ignore_index": ignore}}
        spec = parse_spec({"name": "dense", "storage": str(tmp_path / f"runs-{ignore}"), "stages": [stage]})
        got[ignore] = run_eval(spec.eval_job("report"))["models"][url]["dense"]
    d = got[255]
    assert d["classes"] == 4 and len(d["iou_per_class"]) == 4 and d["ignore_index"] == 255
    assert d["val_tokens"] == 10 * 56 and d["train_tokens"] == 30 * 56  # 8 of 64 patches a row of void
    assert d["high_norm"]["tokens"] == 10 * 64 and 0.0 < d["miou"] <= 1.0
    plain = got[None]
    assert plain["classes"] == 256 and plain["val_tokens"] == 10 * 64 and plain["iou_per_class"][255] is not None
    with pytest.raises(ValueError, match="ignore_index"):
        parse_spec({"name": "d", "storage": str(tmp_path / "r"), "stages": [{**stage, "dense": {"ignore_index": -1}}]})


def test_eval_dense_reads_the_selected_channels_and_gives_a_channelvit_one_token_per_patch(tmp_path, ray_local):
    """4-channel uint16 arrays with masks: a ChannelViT evaluated on 2 of its 4 channels (and on all 4)
    is probed on one token per image patch (the mean of its channel tokens there)."""
    import os

    import numpy as np
    from PIL import Image

    from dataprep.manifest import load_manifest
    from dataprep.prep import PrepOptions, run_prep

    images, masks = write_shapes(str(tmp_path / "shapes"), count=60, size=32, seed=1)
    arrays = tmp_path / "arrays"
    for folder, _, files in os.walk(images):
        for f in files:
            rgb = np.asarray(Image.open(os.path.join(folder, f)).convert("RGB")).astype(np.uint16) * 257
            arr = np.concatenate([rgb.transpose(2, 0, 1), rgb.mean(axis=2, dtype=np.float32)[None].astype(np.uint16)])
            out = arrays / os.path.relpath(os.path.join(folder, f[:-len(".png")] + ".npy"), images)
            out.parent.mkdir(parents=True, exist_ok=True)
            np.save(out, arr)
    data = str(tmp_path / "data")
    run_prep(str(arrays), data, PrepOptions(format="npy", masks=masks, channels=["r", "g", "b", "grey"],
                                            val_fraction=0.25, shard_size=32), progress=False)
    info = load_manifest(data)[0].channels
    torch.manual_seed(0)
    cfg = ModelConfig(**{**TINY, "arch": "channelvit_tiny_patch16_224", "in_chans": 4})
    url = str(tmp_path / "cvit")
    export_encoder(build_encoder(cfg), cfg, url,
                   channels={"names": info.names, "dtype": info.dtype, "mean": info.mean, "std": info.std})
    for channels in (["grey", "r"], None):
        stage = {"name": "report", "kind": "eval", "data": data, "models": [url], "loader_workers": 0,
                 "batch_size": 16, "probe": {"epochs": 2}, "dense": {"solver": "adamw", "epochs": 2},
                 "channels": channels}
        spec = parse_spec({"name": "dense", "storage": str(tmp_path / f"runs-{channels}"), "stages": [stage]})
        d = run_eval(spec.eval_job("report"))["models"][url]["dense"]
        assert d["val_tokens"] == 15 * 64 and d["train_tokens"] == 45 * 64 and d["high_norm"]["tokens"] == 15 * 64
        assert 0.0 < d["miou"] <= 1.0


def test_lbfgs_patch_probe_fits_the_scikit_learn_logistic_regression_on_the_same_features():
    """The dense probe's default solver minimises scikit-learn's ``LogisticRegression`` objective: on the
    standardised digits pixels both give the same class probabilities and the same predictions."""
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    from jobs._probe import Features, fit_logistic_lbfgs

    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x[:600], dtype=torch.float64)
    y = torch.tensor(y[:600])
    train, query = Features(x[:400], y[:400]), x[400:]
    predict = fit_logistic_lbfgs(train, 10, C=0.5, max_iter=1000)  # float64 features: a float64 fit
    mean, std = train.x.mean(0), train.x.std(0, unbiased=False) + 1e-6
    ref = LogisticRegression(C=0.5, max_iter=5000, tol=1e-10).fit(((train.x - mean) / std).numpy(), y[:400].numpy())
    want = ref.predict(((query - mean) / std).numpy())
    assert (predict(query).numpy() == want).all()
    got = predict.proba(query).numpy()
    assert np.abs(got - ref.predict_proba(((query - mean) / std).numpy())).max() < 1e-3


def test_dense_probe_reads_whole_images_at_the_model_size_unlike_the_classification_crop():
    from dataprep.transforms import eval_transform

    img = torch.randint(0, 256, (3, 32, 32), dtype=torch.uint8)
    mask = torch.randint(0, 4, (32, 32))
    whole, m = eval_transform(32, crop_fraction=1.0).augment_pair(img, mask)
    assert torch.equal(whole, img) and torch.equal(m, mask)
    cropped, _ = eval_transform(32, crop_fraction=0.875).augment_pair(img, mask)
    assert not torch.equal(cropped, img)  # resized to 36 and center-cropped: every pixel interpolated


def test_dense_refuses_a_field_of_the_other_solver():
    from pydantic import ValidationError

    from jobs.config.evaluate import DenseConfig

    with pytest.raises(ValidationError, match=r"epochs, lr set with solver: lbfgs, where they have no effect.*"
                                              r"set solver: adamw"):
        DenseConfig(epochs=5, lr=0.1)
    with pytest.raises(ValidationError, match=r"C set with solver: adamw"):
        DenseConfig(solver="adamw", C=2.0)
    assert DenseConfig(solver="adamw", epochs=5).adamw().epochs == 5 and DenseConfig(C=2.0).lbfgs() == (2.0, 300)
    assert DenseConfig.model_validate(DenseConfig(solver="adamw", lr=0.1).model_dump()).adamw().lr == 0.1


def test_ignore_index_unset_leaves_the_digest_of_earlier_dense_evals_as_it_was():
    from jobs.config.evaluate import EvalConfig

    def digest(**dense):
        return EvalConfig(name="e", data="/x", models=["/m"], dense=dense).digest()

    before = "2b72ae6b642b19de8250f7cfb0d68ea4d7eb37b17fd3b61500f93f681ca55abf"  # this stage's, before the field
    assert digest() == digest(ignore_index=None) == before != digest(ignore_index=255)
    dumped = EvalConfig(name="e", data="/x", models=["/m"], dense={}).model_dump(mode="json")
    assert dumped["dense"]["ignore_index"] is None  # in the config, only left out of the digest
