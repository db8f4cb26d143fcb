"""A training stage's metrics as numbered append-only chunks (``jobs/metrics.py``; issue 14 point 10),
against the real SeaweedFS server: bytes uploaded counted by an S3 front that forwards every request.

* every line is uploaded once: the bytes a stage uploads grow linearly with its steps;
* the writer holds only the lines it has not published;
* the reader gives what the one-file ``metrics.jsonl`` of older runs gave, and still reads those runs;
* a resumed attempt's replay replaces the killed attempt's uncommitted tail: every step once, in order;
* a failed upload is retried by the next publish under the same chunk number (nothing lost, nothing twice).
"""

from __future__ import annotations

import json
import logging

import pytest

from _fault_proxy import FaultProxy
from cluster.storage import RetryPolicy, Store
from jobs.metrics import MetricsLog, chunk_indices, read_metrics
from pipeline.runstore import RunView
from tests._runroot_util import make_run, write_metrics


def _record(step: int, loss: float | None = None) -> dict:
    return {"step": step, "epoch": step // 50, "loss": loss if loss is not None else 1.0 / step, "lr": 1e-3,
            "images_per_s": 100.0 + step}


def _line_bytes(records: list[dict]) -> int:
    return sum(len(json.dumps(r, sort_keys=True)) + 1 for r in records)


def _train_like(writer: MetricsLog, steps: range, every: int, held: list[int]) -> list[dict]:
    """What the engine does: a record per step, a (background) publish at every checkpoint."""
    records = []
    for step in steps:
        records.append(_record(step))
        writer.add(records[-1])
        held.append(writer.held_lines())
        if step % every == 0:
            writer.unpublished_text()  # the checkpoint's copy of the unpublished lines
            writer.publish(sync=False)
    return records


def test_each_line_is_uploaded_once_so_bytes_grow_linearly_and_the_writer_holds_only_its_tail(s3, s3_url):
    with FaultProxy(s3.endpoint, lifetime_s=120) as proxy:
        store = Store(s3_url, {"client_kwargs": {"endpoint_url": proxy.endpoint}})
        writer, held = MetricsLog(store, enabled=True, chunk_lines=64), []
        first = _train_like(writer, range(1, 301), every=20, held=held)
        writer.publish(sync=True)
        uploaded_300 = sum(n for path, n in proxy.uploaded.items() if "/metrics/" in path)
        second = _train_like(writer, range(301, 601), every=20, held=held)
        writer.publish(sync=True)
        uploaded_600 = sum(n for path, n in proxy.uploaded.items() if "/metrics/" in path)
    assert uploaded_300 == _line_bytes(first)             # each line once: O(steps) bytes, not O(steps^2)
    assert uploaded_600 == _line_bytes(first + second)
    assert uploaded_600 - uploaded_300 == _line_bytes(second)
    whole_file_each_publish = sum(_line_bytes((first + second)[:k]) for k in range(20, 601, 20))
    assert uploaded_600 * 10 < whole_file_each_publish    # what re-uploading the whole file cost
    assert max(held) <= 2 * 20 and writer.held_lines() == 0  # the unpublished tail (and one in flight) only
    assert chunk_indices(Store(s3_url)) == list(range(30))
    assert read_metrics(Store(s3_url)) == first + second


def test_the_chunk_size_bounds_the_writer_without_any_checkpoint(s3_url):
    writer, held = MetricsLog(Store(s3_url), enabled=True, chunk_lines=25), []
    _train_like(writer, range(1, 201), every=10**9, held=held)
    writer.publish(sync=True)
    assert max(held) <= 2 * 25 and len(chunk_indices(Store(s3_url))) == 8
    assert [r["step"] for r in read_metrics(Store(s3_url))] == list(range(1, 201))


@pytest.mark.parametrize("tail_bytes", [None, 300, 10**6])
def test_chunks_read_back_as_the_one_file_format_gave_them(s3_url, tail_bytes):
    records = [_record(s) for s in range(1, 48)]
    text = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records)
    write_metrics(Store(f"{s3_url}/old"), text, "legacy")
    write_metrics(Store(f"{s3_url}/new"), text, "chunks", chunk_lines=5)
    old, new = read_metrics(Store(f"{s3_url}/old"), tail_bytes), read_metrics(Store(f"{s3_url}/new"), tail_bytes)
    if tail_bytes is None or tail_bytes >= len(text):
        assert old == new == records
    else:  # the newest records: whole chunks covering at least the bytes asked for; the old file's last bytes
        assert new and old and new == records[-len(new):] and old == records[-len(old):]
        assert _line_bytes(new) >= tail_bytes > _line_bytes(old) and len(new) < len(records)


def test_status_and_report_views_of_a_chunked_run_equal_those_of_a_one_file_run(tmp_path):
    make_run(str(tmp_path / "old"), metrics="legacy")
    make_run(str(tmp_path / "new"), metrics="chunks")
    old, new = RunView(str(tmp_path / "old")), RunView(str(tmp_path / "new"))
    # everything but where it is and the live clock of a running stage
    where = ("url", "checkpoint_url", "export_url", "duration_s")
    strip = lambda view: {k: v for k, v in view.as_dict().items() if k not in where}  # noqa: E731
    assert [strip(v) for v in old.stages()] == [strip(v) for v in new.stages()]
    for name in ("pretrain", "probe", "student", "tune"):
        assert old.metrics(name) == new.metrics(name) and new.metrics(name)
    assert (tmp_path / "new" / "stages" / "pretrain" / "metrics" / "00000005.jsonl").exists()
    assert not (tmp_path / "new" / "stages" / "pretrain" / "metrics.jsonl").exists()


def test_a_resumed_attempt_replaces_the_uncommitted_tail_and_continues_the_numbering(s3_url):
    store = Store(s3_url)
    killed = MetricsLog(store, enabled=True)
    for step in range(1, 7):
        killed.add(_record(step))
    checkpoint_text = killed.unpublished_text()  # the checkpoint at step 6 keeps the unpublished lines
    killed.publish(sync=True)
    for step in range(7, 11):  # steps 7..10 were never committed: the attempt is killed after publishing them
        killed.add(_record(step))
    killed.publish(sync=True)
    assert [r["step"] for r in read_metrics(store)] == list(range(1, 11))  # readable until replayed

    resumed = MetricsLog(store, enabled=True)
    resumed.restore(checkpoint_text, upto_step=6)
    for step in range(7, 13):
        resumed.add(_record(step, loss=-step))  # the replay measures again
    resumed.publish(sync=True)
    records = read_metrics(store)
    assert [r["step"] for r in records] == list(range(1, 13))  # every step once, in order
    assert [r["loss"] for r in records[6:]] == [-s for s in range(7, 13)]  # the replay's records won
    assert chunk_indices(store) == [0, 1, 2]  # numbering continued: no chunk rewritten


def test_an_older_run_resumed_from_a_checkpoint_with_the_whole_file_reads_once_per_step(s3_url):
    store = Store(s3_url)
    history = "".join(json.dumps(_record(s), sort_keys=True) + "\n" for s in range(1, 11))
    write_metrics(store, history, "legacy")  # an older writer: steps 1..10, committed up to 6
    resumed = MetricsLog(store, enabled=True)
    resumed.restore(history, upto_step=6)  # an older checkpoint held the whole file
    for step in range(7, 9):
        resumed.add(_record(step, loss=-step))
    resumed.publish(sync=True)
    records = read_metrics(store)
    assert [r["step"] for r in records] == list(range(1, 9)) and records[-1]["loss"] == -8


def test_a_failed_background_upload_is_retried_by_the_next_publish_under_the_same_number(s3, s3_url, caplog):
    caplog.set_level(logging.WARNING, logger="jobs.metrics")
    with FaultProxy(s3.endpoint, slowdown=1.0, lifetime_s=60) as proxy:  # every request answered 503
        store = Store(s3_url, {"client_kwargs": {"endpoint_url": proxy.endpoint}},
                      retry=RetryPolicy(outage_window_s=0.5, first_backoff_s=0.05))
        writer = MetricsLog(store, enabled=True)
        for step in range(1, 4):
            writer.add(_record(step))
        writer.publish(sync=False)
        assert len(writer.unpublished_text().splitlines()) == writer.held_lines() == 3  # kept, not lost
        assert "could not upload metrics chunk" in caplog.text
        proxy.active = False  # the store is back
        writer.add(_record(4))
        writer.publish(sync=True)
    assert chunk_indices(Store(s3_url)) == [0]
    assert [r["step"] for r in read_metrics(Store(s3_url))] == [1, 2, 3, 4]
