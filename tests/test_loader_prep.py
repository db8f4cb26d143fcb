"""The loader reads what the real prep tool writes (run_prep on Ray): every sample once, labels kept."""

from __future__ import annotations

import collections

from dataprep.loader import StreamingLoader
from dataprep.prep import PrepOptions, run_prep
from dataprep.transforms import mae_transform


def test_loader_reads_every_sample_of_a_real_prep_output_once_with_its_label(images_dir, tmp_path, ray_local):
    result = run_prep(images_dir, str(tmp_path / "shards"), PrepOptions(shard_size=16, val_fraction=0.2),
                      progress=False)
    manifest = result.manifest
    for split in ("train", "val"):
        loaders = [StreamingLoader(result.manifest_url, split=split, batch_size=5, seed=1, rank=r, world_size=2,
                                   transform=mae_transform(16)) for r in range(2)]
        batches = [list(ld) for ld in loaders]
        assert len(batches[0]) == len(batches[1]) == loaders[0].batches_per_epoch
        keys = collections.Counter(k for per in batches for b in per for k, p in zip(b["key"], b["pad"]) if not p)
        assert sum(keys.values()) == manifest.split(split).samples == len(keys)
        labels = {int(x) for per in batches for b in per for x in b["label"]}
        assert labels <= set(range(len(manifest.classes)))
        assert batches[0][0]["image"].shape == (5, 3, 16, 16)
