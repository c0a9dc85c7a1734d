import os

import cv2
import numpy as np

from sketch_core.data import read_train_table
from sketch_core.dataset import DecodeCache, DecodedImages, images_key
from sketch_core.transforms import WHITE


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


def test_letterbox_and_stretch_caches_are_separate_files_of_their_own_images(tmp_path):
    path = str(tmp_path / "portrait.png")
    cv2.imwrite(path, np.zeros((40, 32, 3), dtype=np.uint8))  # 4:5, black: white is padding
    assert images_key([path], 32, resize="letterbox") != images_key([path], 32, resize="stretch")
    letterbox = DecodeCache([path], 32, cache_dir=tmp_path / "cache", build_workers=0)
    assert letterbox.resize == "letterbox" and letterbox.file.exists()
    stretch = DecodeCache(
        [path], 32, cache_dir=tmp_path / "cache", build_workers=0, resize="stretch"
    )
    assert (
        stretch.file != letterbox.file and len(list((tmp_path / "cache").glob("decoded-*.u8"))) == 2
    )
    assert (letterbox[0][:, :3] == WHITE).all() and not (stretch[0] == WHITE).any()
    assert np.array_equal(stretch[0], DecodedImages([path], 32, resize="stretch")[0])
    # Opening them again finds each its own file, whichever was built first.
    assert (
        DecodeCache([path], 32, cache_dir=tmp_path / "cache", build_workers=0).file
        == letterbox.file
    )
    assert (
        DecodeCache([path], 32, cache_dir=tmp_path / "cache", resize="stretch").file == stretch.file
    )
