"""The offline image set: loads from the installed wheels only, shapes, labels, order, errors."""

from __future__ import annotations

import importlib.util
import socket
from collections.abc import Iterator

import numpy as np
import pytest

from analyses.tasks import images
from probe.errors import ConfigError, MissingPackageError


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Any attempt to open a connection fails the test; caches are emptied so files are read again."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("the image set tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    images._decode.cache_clear()
    images._lfw.cache_clear()
    yield
    images._decode.cache_clear()
    images._lfw.cache_clear()


def test_whole_set_loads_without_network(no_network: None) -> None:
    records = images.load_images("all")
    assert [r.name for r in records] == list(images.ALL_NAMES)
    assert len(records) == len(images.CATALOGUE) + 200 == 220


def test_every_image_is_rgb_uint8_and_read_only() -> None:
    for r in images.load_images("all"):
        assert r.pixels.dtype == np.uint8 and r.pixels.ndim == 3 and r.pixels.shape[2] == 3, r.name
        assert not r.pixels.flags.writeable
        assert r.kind in images.KINDS and r.source in images.SOURCES
        if r.grayscale:
            assert np.array_equal(r.pixels[..., 0], r.pixels[..., 1])
            assert np.array_equal(r.pixels[..., 0], r.pixels[..., 2])
    full = images.load_images("full_size")
    assert all(min(r.height, r.width) >= 170 for r in full)  # large enough for a 224-px model after resizing


def test_lfw_subset_holds_100_faces_then_100_non_faces() -> None:
    lfw = images.load_images("lfw")
    assert len(lfw) == 200
    assert [r.kind for r in lfw] == ["face"] * 100 + ["non_face"] * 100
    assert [r.has_face for r in lfw] == [True] * 100 + [False] * 100
    assert all(r.pixels.shape == (25, 25, 3) and r.grayscale for r in lfw)
    assert images.image_names("faces") == images.LFW_NAMES[:100]
    assert images.image_names("non_faces") == images.LFW_NAMES[100:]


def test_pixels_equal_the_packages_own_loaders() -> None:
    """The files read by path decode to what scikit-image, scikit-learn and matplotlib return."""
    import skimage.data
    from matplotlib import cbook
    from matplotlib import image as mpl_image
    from sklearn.datasets import load_sample_image

    assert np.array_equal(images.load_image("astronaut").pixels, skimage.data.astronaut())
    camera = skimage.data.camera()
    assert np.array_equal(images.load_image("camera").pixels, np.repeat(camera[..., None], 3, axis=2))
    assert np.array_equal(images.load_image("motorcycle").pixels, skimage.data.stereo_motorcycle()[0])
    assert np.array_equal(images.load_image("china").pixels, load_sample_image("china.jpg"))
    assert np.array_equal(images.load_image("flower").pixels, load_sample_image("flower.jpg"))
    hopper = mpl_image.imread(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
    assert np.array_equal(images.load_image("grace_hopper").pixels, hopper)
    crops = np.round(skimage.data.lfw_subset() * 255).astype(np.uint8)
    lfw = np.stack([r.pixels[..., 0] for r in images.load_images("lfw")])
    assert np.array_equal(lfw, crops)


def test_subsets_partition_the_set_in_catalogue_order() -> None:
    kinds = ("natural", "scientific", "textures", "documents")
    full = images.image_names("full_size")
    assert sorted(n for s in kinds for n in images.image_names(s)) == sorted(full)
    assert len(images.image_names("natural")) == 10
    assert images.image_names("full_size") + images.image_names("lfw") == images.ALL_NAMES
    by_source = [n for s in images.SOURCES for n in images.image_names(s)]
    assert sorted(by_source) == sorted(images.ALL_NAMES)
    for subset in images.SUBSETS:
        names = images.image_names(subset)
        assert list(names) == [n for n in images.ALL_NAMES if n in names]  # catalogue order


def test_named_images_come_back_in_catalogue_order_once() -> None:
    records = images.load_images(["flower", "astronaut", "lfw_non_face_003", "astronaut"])
    assert [r.name for r in records] == ["astronaut", "flower", "lfw_non_face_003"]
    assert records[2].kind == "non_face" and not records[2].has_face


def test_labels_of_known_images() -> None:
    assert images.load_image("chelsea").subject == "a tabby cat"
    faces = {r.name for r in images.load_images("full_size") if r.has_face}
    assert faces == {"astronaut", "camera", "grace_hopper"}
    assert {r.name for r in images.load_images("textures")} == {"brick", "grass", "gravel"}


def test_repeated_loads_are_identical() -> None:
    first = images.load_image("coffee").pixels
    second = images.load_image("coffee").pixels
    assert first.tobytes() == second.tobytes()


def test_image_table_has_one_row_per_image() -> None:
    table = images.image_table(images.load_images("natural"))
    assert list(table.columns) == [
        "name",
        "source",
        "kind",
        "subject",
        "has_face",
        "grayscale",
        "height",
        "width",
    ]
    assert len(table) == 10 and set(table.kind) == {"natural"}


def test_unknown_subset_and_name_say_what_to_use() -> None:
    with pytest.raises(ConfigError, match="choose one of all, full_size"):
        images.load_images("photos")
    with pytest.raises(ConfigError, match="Did you mean 'astronaut'"):
        images.load_image("astronuat")
    with pytest.raises(ConfigError, match="at least one name"):
        images.load_images([])


def test_missing_package_names_the_pip_command(monkeypatch: pytest.MonkeyPatch) -> None:
    real_find_spec = importlib.util.find_spec

    def without_sklearn(name: str, *args: object, **kwargs: object) -> object:
        return None if name == "sklearn" else real_find_spec(name, *args, **kwargs)  # type: ignore[arg-type]

    images._decode.cache_clear()
    monkeypatch.setattr(images.importlib.util, "find_spec", without_sklearn)
    with pytest.raises(MissingPackageError, match="install it with: pip install scikit-learn"):
        images.load_image("china")
    images._decode.cache_clear()


def test_missing_file_names_the_reinstall_command(monkeypatch: pytest.MonkeyPatch) -> None:
    images._decode.cache_clear()
    monkeypatch.setitem(
        images._PACKAGES, "matplotlib", ("matplotlib", "no-such-folder", "pip install matplotlib")
    )
    with pytest.raises(MissingPackageError, match="pip install --force-reinstall matplotlib"):
        images.load_image("grace_hopper")
    images._decode.cache_clear()
