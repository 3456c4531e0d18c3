"""The decoding pool: every usable core, threads or processes from one setting, and the same
order, store and errors from feature extraction and predict.py whichever kind decodes."""

from __future__ import annotations

import concurrent.futures
import os
import pickle

import numpy as np
import pytest
from PIL import Image

from symbol_trainer import decoding, prediction
from symbol_trainer.errors import ImageReadError
from symbol_trainer.features import decoded_chunks
from symbol_trainer.images import ImageGeometry, load_image_array
from symbol_trainer.pixel_store import PixelStore

GEOMETRY = ImageGeometry(10, 12, "letterbox")


def frames(folder, count: int) -> list[str]:
    paths = []
    for i in range(count):
        path = folder / f"frame_{i}.jpg"
        Image.new("RGB", (24, 20), (i * 30, 0, 0)).save(path, quality=95)
        paths.append(str(path))
    return paths


@pytest.mark.parametrize("text, expected", [("max 100000", None), ("150000 100000", 2),
                                            ("200000 100000", 2), ("50000 100000", 1),
                                            ("garbage", None)])
def test_cgroup_v2_limit_in_whole_cores(tmp_path, text, expected):
    (tmp_path / "cpu.max").write_text(text + "\n")
    assert decoding.cgroup_cpu_limit(tmp_path / "cpu.max", tmp_path / "no", tmp_path / "no") == expected


def test_cgroup_v1_limit_and_no_limit(tmp_path):
    quota, period = tmp_path / "quota", tmp_path / "period"
    period.write_text("100000\n")
    quota.write_text("300000\n")
    assert decoding.cgroup_cpu_limit(tmp_path / "none", quota, period) == 3
    quota.write_text("-1\n")
    assert decoding.cgroup_cpu_limit(tmp_path / "none", quota, period) is None
    assert decoding.cgroup_cpu_limit(tmp_path / "a", tmp_path / "b", tmp_path / "c") is None


def test_usable_cores_follow_the_affinity_and_the_cgroup_limit(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3, 4, 5}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.setattr(decoding, "cgroup_cpu_limit", lambda: None)
    assert decoding.usable_cores() == 6  # a job given 6 of the node's 64 cores
    monkeypatch.setattr(decoding, "cgroup_cpu_limit", lambda: 4)
    assert decoding.usable_cores() == 4  # a container limited to 4 cores
    assert decoding.decode_workers() == 4
    monkeypatch.setattr(decoding, "cgroup_cpu_limit", lambda: 16)
    assert decoding.usable_cores() == 6


def test_the_pool_kind_is_one_setting(monkeypatch):
    monkeypatch.setattr(decoding, "usable_cores", lambda: 3)
    with decoding.decode_pool() as pool:  # one worker per usable core by default
        assert pool._max_workers == 3
    with decoding.decode_pool(2) as pool:
        assert isinstance(pool, concurrent.futures.ThreadPoolExecutor)
        assert not decoding.in_processes(pool)
    monkeypatch.setattr(decoding, "POOL_KIND", "processes")
    with decoding.decode_pool(1) as pool:
        assert decoding.in_processes(pool)
    with pytest.raises(ValueError, match="threads, processes"):
        decoding.decode_pool(1, kind="fibres")


def test_an_image_read_error_survives_pickling():
    """A decoding process hands its error back pickled: it must arrive whole."""
    error = pickle.loads(pickle.dumps(ImageReadError("/data/frame_4.jpg", "cannot be decoded")))
    assert isinstance(error, ImageReadError)
    assert (error.path, error.reason) == ("/data/frame_4.jpg", "cannot be decoded")
    assert str(error) == "/data/frame_4.jpg: cannot be decoded"


def test_the_store_takes_images_decoded_elsewhere(tmp_path):
    paths = frames(tmp_path, 2)
    with PixelStore(paths, (10, 12, 3), lambda p: load_image_array(p, GEOMETRY), tmp_path) as store:
        assert store.cached(paths[0]) is None
        image = load_image_array(paths[0], GEOMETRY)
        store.put(paths[0], image)
        store.put("elsewhere.jpg", image)  # not one of its paths: ignored
        store.put(paths[1], image[:5])     # another shape: not kept
        assert store.filled == 1
        np.testing.assert_array_equal(store.cached(paths[0]), image)
        assert store.cached(paths[1]) is None


def test_decoding_processes_keep_order_fill_the_store_and_name_an_unreadable_file(tmp_path):
    paths = frames(tmp_path, 7)
    expected = [load_image_array(p, GEOMETRY) for p in paths]
    calls = []
    store = PixelStore(paths, (10, 12, 3), lambda p: (calls.append(p),
                       load_image_array(p, GEOMETRY))[1], tmp_path)
    chunks = list(decoded_chunks(paths, GEOMETRY, 3, store, pool_kind="processes"))
    assert [len(c) for c in chunks] == [3, 3, 1]
    np.testing.assert_array_equal(np.concatenate(chunks), np.stack(expected))
    assert store.filled == 7 and calls == []  # decoded by the processes, stored here
    (tmp_path / "frame_4.jpg").write_bytes(b"not an image")
    again = list(decoded_chunks(paths, GEOMETRY, 3, store, pool_kind="processes"))
    np.testing.assert_array_equal(np.concatenate(again), np.stack(expected))  # from the store
    with pytest.raises(ImageReadError, match="frame_4.jpg"):
        list(decoded_chunks(paths, GEOMETRY, 3, pool_kind="processes"))


def test_predict_decodes_in_processes_in_order_with_error_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(decoding, "POOL_KIND", "processes")
    paths = frames(tmp_path, 5)
    (tmp_path / "frame_2.jpg").write_bytes(b"broken")
    inputs = prediction.collect_inputs([str(tmp_path)])
    got = list(prediction.frame_stream(inputs, GEOMETRY, batch_size=2, fps=None, workers=2))
    assert [f.filename for f in got] == [f"frame_{i}.jpg" for i in range(5)]
    assert got[2].pixels is None and "frame_2.jpg" in got[2].error
    np.testing.assert_array_equal(got[4].pixels, load_image_array(paths[4], GEOMETRY))
