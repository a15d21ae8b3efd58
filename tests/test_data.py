"""Dataset layouts (tiny fixtures in each), safe loading, transforms, samplers, demo set, export."""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_class_folders, write_image
from PIL import Image

from deepemd.data import (
    EpisodeSampler,
    ImageDataset,
    build_transform,
    class_balanced_sampler,
    demo_root,
    export_fashion_mnist,
    load_image,
    read_layout,
)
from deepemd.data.fashion_mnist import SOURCE as FASHION_SOURCE
from deepemd.errors import DeepEMDError


def _names(image_list) -> list[str]:
    return [p.name for p in image_list.paths]


# ---------------------------------------------------------------- layouts


def test_folder_default_split_is_sorted_halves(folder_dataset):
    train = read_layout("folder", folder_dataset, "train")
    test = read_layout("folder", folder_dataset, "test")
    assert train.classes == ["class_a", "class_b", "class_c"] and test.classes == ["class_d", "class_e"]
    assert len(train) == 18 and len(test) == 12 and len(read_layout("folder", folder_dataset, "all")) == 30
    assert train.labels.dtype == np.int64 and train.labels.tolist() == [0] * 6 + [1] * 6 + [2] * 6
    assert all(p.parent.name == train.classes[y] for p, y in zip(train.paths, train.labels))


def test_folder_split_file_overrides_the_halves(folder_dataset):
    (folder_dataset / "split.csv").write_text("class,split\nclass_e,train\nclass_a,val\nclass_b,test\nclass_c,test\n")
    assert read_layout("folder", folder_dataset, "train").classes == ["class_e"]
    assert read_layout("folder", folder_dataset, "val").classes == ["class_a"]
    assert read_layout("folder", folder_dataset, "test").classes == ["class_b", "class_c"]
    (folder_dataset / "split.csv").write_text("class,split\nclass_z,train\n")
    with pytest.raises(DeepEMDError, match="split.csv: split file names class 'class_z'"):
        read_layout("folder", folder_dataset, "train")


def test_folder_val_without_split_file_is_explained(folder_dataset):
    with pytest.raises(DeepEMDError, match="split 'val' needs a split file"):
        read_layout("folder", folder_dataset, "val")
    with pytest.raises(DeepEMDError, match="mine.csv: split file not found"):
        read_layout("folder", folder_dataset, "train", split_file=folder_dataset / "mine.csv")


def test_folder_without_classes_is_explained(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DeepEMDError, match="empty: folder has no class sub-folders"):
        read_layout("folder", tmp_path / "empty", "all")
    (tmp_path / "empty" / "cats").mkdir()
    with pytest.raises(DeepEMDError, match="cats: class folder holds no images"):
        read_layout("folder", tmp_path / "empty", "all")


def test_only_regular_files_are_images(folder_dataset):
    (folder_dataset / "class_a" / "x.png").mkdir()  # a folder with an image suffix
    (folder_dataset / "class_a" / "x.png" / "inner.png").write_bytes(b"")
    (folder_dataset / "class_b" / "link.png").symlink_to(folder_dataset / "class_b" / "img00.png")
    (folder_dataset / "class_c" / "dangling.png").symlink_to(folder_dataset / "nowhere.png")
    images = read_layout("folder", folder_dataset, "train")
    names = {(p.parent.name, p.name) for p in images.paths}
    assert ("class_a", "x.png") not in names and ("class_c", "dangling.png") not in names
    assert ("class_b", "link.png") in names and len(images) == 18 + 1


def test_output_folder_inside_the_data_root_is_never_listed(folder_dataset, tmp_path, monkeypatch):
    before = read_layout("folder", folder_dataset, "all")
    out = folder_dataset / "runs" / "eval"  # a previous run's --out, with a picture in it
    write_image(out / "flows.png")
    write_image(folder_dataset / "runs" / "other.png")  # beside the output: still a class "runs"
    monkeypatch.chdir(folder_dataset)
    after = read_layout("folder", folder_dataset, "all", exclude=[Path("runs/eval"), None])
    assert after.classes == before.classes + ["runs"] and len(after) == len(before) + 1
    assert read_layout("folder", folder_dataset, "all", exclude=[folder_dataset / "runs"]).classes == before.classes
    write_image(folder_dataset / "class_a" / "out" / "results.png")  # --out inside a class folder
    assert len(read_layout("folder", folder_dataset, "all", exclude=["class_a/out", "runs"])) == len(before)
    split = tmp_path / "tiered"
    make_class_folders(split / "train", ["c0", "c1"], 2)
    write_image(split / "train" / "gallery" / "x.png")
    assert read_layout("tieredimagenet", split, "train", exclude=[split / "train" / "gallery"]).classes == ["c0", "c1"]


def test_both_jobs_leave_their_out_folder_out_of_the_images(folder_dataset):
    from deepemd.build import read_images
    from deepemd.fewshot.config import EvalConfig as FewShotEval
    from deepemd.retrieval.config import IndexConfig

    out = folder_dataset / "gallery"
    write_image(out / "flows.png")  # what the previous run left there
    for cls in (IndexConfig, FewShotEval):
        cfg = cls(data_root=str(folder_dataset), out=str(out))
        assert read_images(cfg, "all", 0).classes == [f"class_{c}" for c in "abcde"], cls.__name__


def _csv_split_layout(root: Path) -> Path:
    """miniImageNet / CUB few-shot: images/ + split/{train,val,test}.csv (filename,label)."""
    for split, classes in {"train": ["n01", "n02"], "val": ["n03"], "test": ["n04", "n05"]}.items():
        rows = ["filename,label"]
        for c in classes:
            for i in range(3):
                name = f"{c}_{i:04d}.jpg"
                write_image(root / "images" / name, seed=i)
                rows.append(f"{name},{c}")
        (root / "split").mkdir(parents=True, exist_ok=True)
        (root / "split" / f"{split}.csv").write_text("\n".join(rows) + "\n")
    return root


@pytest.mark.parametrize("layout", ["miniimagenet", "cub"])
def test_csv_split_layouts(tmp_path, layout):
    root = _csv_split_layout(tmp_path / layout)
    test = read_layout(layout, root, "test")
    assert test.classes == ["n04", "n05"] and len(test) == 6 and test.labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert _names(test)[3] == "n05_0000.jpg" and test.paths[3].parent == root / "images"
    assert read_layout(layout, root, "val").classes == ["n03"]
    (root / "split" / "val.csv").unlink()
    with pytest.raises(DeepEMDError, match="val.csv: split file for 'val' not found"):
        read_layout(layout, root, "val")


def test_csv_split_listing_a_missing_image(tmp_path):
    root = _csv_split_layout(tmp_path / "mini")
    (root / "images" / "n01_0001.jpg").unlink()
    with pytest.raises(DeepEMDError, match="n01_0001.jpg: image listed in train.csv not found"):
        read_layout("miniimagenet", root, "train")


@pytest.mark.parametrize(
    "layout,folders",
    [
        ("tieredimagenet", ("train", "val", "test")),
        ("fc100", ("train", "val", "test")),
        ("cifarfs", ("meta-train", "meta-val", "meta-test")),
    ],
)
def test_split_folder_layouts(tmp_path, layout, folders):
    root = tmp_path / layout
    for k, folder in enumerate(folders):
        make_class_folders(root / folder, [f"{folder}_c{j}" for j in range(k + 2)], 2)
    for k, split in enumerate(("train", "val", "test")):
        images = read_layout(layout, root, split)
        assert images.classes == [f"{folders[k]}_c{j}" for j in range(k + 2)] and len(images) == 2 * (k + 2)
    (root / folders[1]).rename(root / "elsewhere")
    with pytest.raises(DeepEMDError, match=f"{folders[1]}: split folder for 'val' not found"):
        read_layout(layout, root, "val")


def test_cub_retrieval_classes_1_to_100_train_101_to_200_test(tmp_path):
    root = tmp_path / "CUB_200_2011"
    images, labels, classes = [], [], []
    for c in range(1, 201):
        name = f"{c:03d}.Bird_{c}"
        classes.append(f"{c} {name}")
        for i in range(2):
            idx = len(images) + 1
            rel = f"{name}/Bird_{c}_{i}.jpg"
            write_image(root / "images" / rel, size=(8, 8), seed=idx)
            images.append(f"{idx} {rel}")
            labels.append(f"{idx} {c}")
    for fname, lines in (("images.txt", images), ("image_class_labels.txt", labels), ("classes.txt", classes)):
        (root / fname).write_text("\n".join(lines) + "\n")
    train, test = read_layout("cub-retrieval", root, "train"), read_layout("cub-retrieval", root, "test")
    assert len(train.classes) == 100 and len(test.classes) == 100 and len(train) == 200
    assert train.classes[0] == "001.Bird_1" and test.classes[0] == "101.Bird_101" and test.classes[-1] == "200.Bird_200"
    assert test.paths[0].name == "Bird_101_0.jpg" and test.labels[:4].tolist() == [0, 0, 1, 1]
    (root / "classes.txt").unlink()
    with pytest.raises(DeepEMDError, match="classes.txt: CUB-200-2011 file not found"):
        read_layout("cub-retrieval", root, "test")


def test_missing_root_and_unknown_layout(tmp_path):
    for layout in ("folder", "miniimagenet", "tieredimagenet", "cifarfs", "fc100", "cub", "cub-retrieval"):
        with pytest.raises(DeepEMDError, match="nowhere: dataset root not found"):
            read_layout(layout, tmp_path / "nowhere", "train")
    with pytest.raises(DeepEMDError, match="did you mean 'cifarfs'"):
        read_layout("cifar-fs", tmp_path, "train")


# ---------------------------------------------------------------- safe loading


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A valid PNG header claiming ``width x height`` with one row of pixel data (~100 bytes):
    decoding it would fail or take gigabytes, so only a check before decoding stops it cleanly."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (3 * width + 1))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))
    return path


def test_greyscale_becomes_rgb(tmp_path):
    path = write_image(tmp_path / "grey.png", size=(10, 7), mode="L")
    image = load_image(path)
    assert image.mode == "RGB" and image.size == (10, 7)
    grey = np.asarray(Image.open(path))
    assert (np.asarray(image) == grey[..., None]).all()


def _png16(path: Path, samples: np.ndarray, color_type: int) -> Path:
    """A 16-bit PNG written byte by byte (big-endian samples, filter 0), not by PIL, so the test
    does not trust the library it checks. ``color_type``: 0 grey, 2 RGB, 4 grey+alpha, 6 RGBA."""
    height, width = samples.shape[:2]
    rows = b"".join(b"\x00" + samples[y].astype(">u2").tobytes() for y in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(rows)) + _chunk(b"IEND", b"")
    )
    return path


def _rgb8_of_grey(grey: np.ndarray) -> np.ndarray:
    return np.repeat(grey[..., None], 3, axis=2)


def test_sixteen_bit_grey_png_is_scaled_not_clipped(tmp_path):
    rng = np.random.default_rng(7)
    eight = rng.integers(0, 256, (12, 10), dtype=np.uint16)
    image = load_image(_png16(tmp_path / "g16.png", eight * 257, color_type=0))  # 8-bit scaled by 257
    assert image.mode == "RGB" and (np.asarray(image) == _rgb8_of_grey(eight)).all()
    any16 = rng.integers(0, 65536, (12, 10), dtype=np.int64)
    expected = ((any16 * 255 + 32767) // 65535).astype(np.uint8)  # round(v * 255 / 65535)
    image = load_image(_png16(tmp_path / "any16.png", any16, color_type=0))
    assert (np.asarray(image) == _rgb8_of_grey(expected)).all()
    assert (np.asarray(image) == 255).mean() < 0.01


@pytest.mark.parametrize("color_type, channels", [(2, 3), (4, 2), (6, 4)], ids=["rgb48", "grey-alpha32", "rgba64"])
def test_sixteen_bit_colour_and_alpha_pngs_keep_their_values(tmp_path, color_type, channels):
    eight = np.random.default_rng(color_type).integers(0, 256, (9, 11, channels), dtype=np.uint16)
    image = np.asarray(load_image(_png16(tmp_path / "c.png", eight * 257, color_type)))
    colour = eight[..., :3] if channels >= 3 else _rgb8_of_grey(eight[..., 0])
    assert (image == colour).all()


def test_other_high_bit_depth_modes(tmp_path):
    eight = np.random.default_rng(3).integers(0, 256, (8, 6), dtype=np.uint16)
    big_endian = Image.frombytes("I;16B", (6, 8), (eight * 257).astype(">u2").tobytes())
    big_endian.save(tmp_path / "be.tif")
    assert Image.open(tmp_path / "be.tif").mode == "I;16B"
    (tmp_path / "12bit.pgm").write_bytes(
        b"P5 6 8 4095\n" + (eight.astype(np.int64) * 4095 // 255).astype(">u2").tobytes()
    )
    assert Image.open(tmp_path / "12bit.pgm").mode == "I"
    Image.fromarray(eight.astype(np.float32) / 255).save(tmp_path / "unit.tif")
    assert Image.open(tmp_path / "unit.tif").mode == "F"
    for name in ("be.tif", "12bit.pgm", "unit.tif"):
        got = np.asarray(load_image(tmp_path / name)).astype(int)
        assert np.abs(got - _rgb8_of_grey(eight)).max() <= 1, name  # 4095 steps: rounding differs by 1
    # a 32-bit image beyond 16 bits declares no white level: its range is stretched to 0..255
    wide = eight.astype(np.int32) * 1_000_000 - 50_000_000
    Image.fromarray(wide).save(tmp_path / "wide.tif")
    got = np.asarray(load_image(tmp_path / "wide.tif"))[..., 0].astype(int)
    stretched = np.rint((eight - eight.min()) * 255 / (eight.max() - eight.min()))
    assert np.abs(got - stretched).max() <= 1 and got.min() == 0 and got.max() == 255


def test_corrupt_png_is_named(tmp_path):
    path = tmp_path / "broken.png"
    path.write_bytes(write_image(tmp_path / "ok.png").read_bytes()[:60] + b"garbage" * 10)
    with pytest.raises(DeepEMDError, match="broken.png: cannot read image"):
        load_image(path)


def test_truncated_jpeg_is_named(tmp_path):
    good = write_image(tmp_path / "good.jpg", size=(64, 64))
    path = tmp_path / "cut.jpg"
    path.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(DeepEMDError, match="cut.jpg: cannot read image: corrupt or truncated"):
        load_image(path)


def test_pixel_limit_is_checked_before_decoding(tmp_path):
    huge = _png_header_only(tmp_path / "huge.png", 10_000, 8_000)  # 80 MP declared, no data
    with pytest.raises(DeepEMDError, match="huge.png: image is 10000x8000 = 80.0 MP, over the limit of 50 MP"):
        load_image(huge)
    bomb = _png_header_only(tmp_path / "bomb.png", 30_000, 30_000)  # past PIL's own bomb guard
    with pytest.raises(DeepEMDError, match="bomb.png: image refused as a decompression bomb"):
        load_image(bomb, max_pixels=10**10)
    small = write_image(tmp_path / "small.png", size=(20, 20))
    with pytest.raises(DeepEMDError, match="small.png: image is 20x20"):
        load_image(small, max_pixels=399)


def test_image_dataset_errors_name_the_file_or_skip_with_a_count(folder_dataset):
    bad = folder_dataset / "class_b" / "img03.png"
    bad.write_bytes(b"not an image")
    images = read_layout("folder", folder_dataset, "train")
    dataset = ImageDataset(images, build_transform(16))
    with pytest.raises(DeepEMDError, match="img03.png: cannot read image"):
        dataset[images.paths.index(bad)]
    with pytest.warns(UserWarning, match="skipped 1 of 18 images"):
        safe = ImageDataset(images, build_transform(16), skip_bad=True)
    assert len(safe) == 17 and bad not in safe.image_list.paths and safe.skipped[0][0] == bad
    assert safe.labels.tolist().count(1) == 5
    x, y = safe[7]
    assert x.shape == (3, 16, 16) and y == int(safe.labels[7])


# ---------------------------------------------------------------- transforms


def test_test_transform_is_resize_92_84_then_normalise():
    cfg = {"input_size": 84, "mean": (0.5, 0.25, 0.0), "std": (0.5, 0.25, 1.0)}
    image = Image.fromarray(np.full((100, 200, 3), 255, dtype=np.uint8))
    out = build_transform(cfg, train=False)(image)
    assert out.shape == (3, 84, 84)
    torch.testing.assert_close(out[:, 0, 0], torch.tensor([1.0, 3.0, 1.0]))  # (1 - mean) / std
    steps = [type(t).__name__ for t in build_transform(cfg, train=False).transforms]
    assert steps == ["ToImage", "Resize", "CenterCrop", "ToDtype", "Normalize"]
    assert build_transform(cfg).transforms[1].size == [92]
    assert build_transform(224).transforms[1].size == [245]  # 224 * 92 / 84


def test_train_transform_is_random_resized_crop_and_flip():
    transform = build_transform({"input_size": 32, "mean": (0.5,) * 3, "std": (0.5,) * 3}, train=True)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (50, 70, 3), dtype=np.uint8))
    torch.manual_seed(0)
    a, b = transform(image), transform(image)
    assert a.shape == b.shape == (3, 32, 32) and not torch.equal(a, b)
    assert [type(t).__name__ for t in transform.transforms][1:3] == ["RandomResizedCrop", "RandomHorizontalFlip"]


# ---------------------------------------------------------------- samplers


def test_episode_layout_and_determinism():
    labels = np.repeat(np.arange(8), 10)
    sampler = EpisodeSampler(labels, way=3, shot=2, query=4, episodes=5, seed=7)
    episodes = list(sampler)
    assert len(episodes) == len(sampler) == 5
    for ep in episodes:
        assert len(ep) == 3 * 2 + 3 * 4 and len(set(ep)) == len(ep)
        support, query = labels[ep[:6]], labels[ep[6:]]
        assert len(set(support.tolist())) == 3
        assert (support == np.repeat(support[::2], 2)).all()  # class-major shots
        assert (query == np.repeat(support[::2], 4)).all()  # queries in the same class order
    assert episodes == list(EpisodeSampler(labels, 3, 2, 4, 5, seed=7))
    assert episodes != list(EpisodeSampler(labels, 3, 2, 4, 5, seed=8))
    sampler.set_epoch(1)
    assert list(sampler) != episodes


def test_episode_sampler_as_dataloader_batch_sampler(folder_dataset):
    images = read_layout("folder", folder_dataset, "all")
    dataset = ImageDataset(images, build_transform(16))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=EpisodeSampler(images, 2, 1, 2, 3, seed=0))
    batches = list(loader)
    assert len(batches) == 3
    x, y = batches[0]
    assert x.shape == (6, 3, 16, 16) and y[0] == y[2] == y[3] and y[1] == y[4] == y[5]


def test_too_small_class_is_named(folder_dataset):
    for extra in sorted((folder_dataset / "class_c").iterdir())[2:]:
        extra.unlink()
    images = read_layout("folder", folder_dataset, "all")
    with pytest.raises(DeepEMDError, match="class 'class_c' has 2 images, fewer than shot \\+ query = 4"):
        EpisodeSampler(images, way=2, shot=1, query=3, episodes=1)
    with pytest.raises(DeepEMDError, match="6-way episodes need 6 classes"):
        EpisodeSampler(images, way=6, shot=1, query=1, episodes=1)


def test_class_balanced_sampler_gives_m_per_class():
    labels = np.repeat(np.arange(6), 9)
    sampler = class_balanced_sampler(labels, m=3, batch_size=12)
    order = list(iter(sampler))
    for start in range(0, len(order) - 11, 12):
        _, counts = np.unique(labels[order[start : start + 12]], return_counts=True)
        assert counts.tolist() == [3, 3, 3, 3]
    with pytest.raises(DeepEMDError, match="multiple of m=4"):
        class_balanced_sampler(labels, m=4, batch_size=10)


# ---------------------------------------------------------------- bundled data


def test_demo_root_is_the_omniglot_folder_layout():
    root = demo_root()
    assert demo_root() == root  # extracted once, then reused
    assert not [p for p in root.parent.iterdir() if p.name.endswith(".tmp")]  # no leftover temp dirs
    train, test = read_layout("folder", root, "train"), read_layout("folder", root, "test")
    assert (len(train.classes), len(test.classes)) == (136, 106)
    assert not set(train.classes) & set(test.classes)
    assert {c.split("_character")[0] for c in test.classes} == {"Japanese_(katakana)", "Sanskrit", "Tagalog"}
    assert np.bincount(test.labels).tolist() == [20] * 106
    assert (root / "LICENSE").is_file()
    image = load_image(test.paths[0])
    assert image.size == (105, 105) and image.mode == "RGB"


needs_fashion = pytest.mark.skipif(
    not (FASHION_SOURCE / "t10k-labels-idx1-ubyte.gz").is_file(), reason="Debian dataset-fashion-mnist is not installed"
)


@needs_fashion
def test_export_fashion_mnist_writes_the_idx_pixels(tmp_path):
    out = export_fashion_mnist(tmp_path / "fm", per_class=2)
    with gzip.open(FASHION_SOURCE / "train-images-idx3-ubyte.gz") as fh:
        pixels = np.frombuffer(fh.read(), np.uint8, offset=16).reshape(-1, 28, 28)
    with gzip.open(FASHION_SOURCE / "train-labels-idx1-ubyte.gz") as fh:
        labels = np.frombuffer(fh.read(), np.uint8, offset=8)
    train = read_layout("folder", out, "train")
    assert train.classes == ["0_T-shirt_top", "1_Trouser", "2_Pullover", "3_Dress", "4_Coat"] and len(train) == 10
    first_trouser = int(np.flatnonzero(labels == 1)[0])
    png = out / "1_Trouser" / f"{first_trouser:05d}.png"
    assert (np.asarray(Image.open(png)) == pixels[first_trouser]).all()
    assert export_fashion_mnist(tmp_path / "fm", per_class=2) == out  # reused, not rewritten
    with pytest.raises(DeepEMDError, match="fm: folder exists but is not a Fashion-MNIST export"):
        export_fashion_mnist(tmp_path / "fm", per_class=3)
