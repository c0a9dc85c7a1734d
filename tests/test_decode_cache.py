import os

import numpy as np

from sketch_core.data import read_train_table
from sketch_core.dataset import DecodeCache, DecodedImages


def test_cache_returns_the_decoded_images_and_is_rebuilt_when_its_key_changes(demo_dir, tmp_path):
    paths = read_train_table(demo_dir).paths[:12]
    direct = DecodedImages(paths, 32)
    cache = DecodeCache(paths, 32, cache_dir=tmp_path, build_workers=0)
    assert cache.file.exists()
    for index in range(len(paths)):
        assert np.array_equal(cache[index], direct[index])

    same = DecodeCache(paths, 32, cache_dir=tmp_path, build_workers=0)
    assert same.file == cache.file and same.file.stat().st_mtime_ns == cache.file.stat().st_mtime_ns
    assert DecodeCache(paths, 40, cache_dir=tmp_path, build_workers=0).file != cache.file
    assert DecodeCache(paths[:6], 32, cache_dir=tmp_path, build_workers=0).file != cache.file

    os.utime(paths[0], ns=(0, 0))  # the image file changed
    rebuilt = DecodeCache(paths, 32, cache_dir=tmp_path, build_workers=0)
    assert rebuilt.file != cache.file and rebuilt.file.exists()
    assert not list(tmp_path.glob("*.partial-*"))
