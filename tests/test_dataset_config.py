"""Dataset TOML validation (musubi semantics, strict errors), item enumeration and per-bucket batching."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from dataset.buckets import make_batches
from dataset.config import DatasetSpec, load_dataset_config, parse_dataset_config, round_to_4k1
from dataset.sources import iter_items
from kandinsky5.common import UserError


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def _parse(general: dict | None = None, *datasets: dict):
    data = {"datasets": list(datasets)}
    if general is not None:
        data["general"] = general
    return parse_dataset_config(data)


def _image(directory: str = "img", **extra) -> dict:
    return {"image_directory": directory, "caption_extension": ".txt", **extra}


def _video(directory: str = "vid", **extra) -> dict:
    return {"video_directory": directory, "caption_extension": ".txt", **extra}


# ------------------------------------------------------------------------------------------------------------
# Config loading
# ------------------------------------------------------------------------------------------------------------

MUSUBI_EXAMPLE = """
# a musubi-tuner style config, unchanged
[general]
resolution = [960, 544]
caption_extension = ".txt"
batch_size = 1
enable_bucket = true
bucket_no_upscale = false

[[datasets]]
image_directory = "{root}/images"
cache_directory = "{root}/cache_images"
num_repeats = 2

[[datasets]]
video_directory = "{root}/videos"
cache_directory = "{root}/cache_videos"
target_frames = [1, 25, 45]
frame_extraction = "head"
source_fps = 30.0

[[datasets]]
video_jsonl_file = "{root}/videos.jsonl"
cache_directory = "{root}/cache_jsonl"
resolution = 512
target_frames = [17]
frame_extraction = "uniform"
frame_sample = 3
"""


def test_musubi_config_loads_unchanged(tmp_path, caplog):
    cfg_path = _write(tmp_path / "ds.toml", MUSUBI_EXAMPLE.format(root=tmp_path.as_posix()))
    with caplog.at_level(logging.WARNING):
        cfg = load_dataset_config(cfg_path)
    images, videos, jsonl = cfg.datasets
    assert (images.kind, images.resolution, images.num_repeats, images.enable_bucket) == ("image", (960, 544), 2, True)
    assert images.directory == tmp_path / "images" and images.cache_directory == tmp_path / "cache_images"
    assert images.target_frames == (1,)  # video keys never leak into image datasets
    assert videos.kind == "video" and videos.source_fps == 30.0 and videos.batch_size == 1
    assert videos.target_frames == (1, 25, 45)
    assert jsonl.jsonl_file == tmp_path / "videos.jsonl" and jsonl.directory is None
    assert jsonl.resolution == (512, 512) and jsonl.frame_sample == 3 and jsonl.target_frames == (17,)
    assert cfg.image_datasets == (images,) and cfg.video_datasets == (videos, jsonl)
    assert "4k+1" not in caplog.text  # 1, 25, 45, 17 are all valid


def test_defaults_and_precedence():
    cfg = _parse({"batch_size": 4, "resolution": 512}, _image(), _image("img2", batch_size=2, cache_directory="c"))
    first, second = cfg.datasets
    assert (first.batch_size, second.batch_size) == (4, 2)
    assert first.resolution == (512, 512)
    assert (first.num_repeats, first.enable_bucket, first.bucket_no_upscale) == (1, False, False)
    assert first.cache_directory == Path("img")  # default: the media directory, as musubi
    assert isinstance(first, DatasetSpec) and first.name == "datasets[0]" and first.media_key == "image_directory"
    with pytest.raises(AttributeError):
        first.batch_size = 3  # frozen


def test_video_defaults_and_general_video_keys():
    cfg = _parse({"target_frames": [9], "frame_extraction": "slide", "frame_stride": 4}, _image(), _video())
    image, video = cfg.datasets
    assert (video.target_frames, video.frame_extraction, video.frame_stride) == ((9,), "slide", 4)
    assert (image.target_frames, image.frame_extraction) == ((1,), "head")
    plain = _parse(None, _video()).datasets[0]
    assert (plain.target_frames, plain.frame_extraction, plain.max_frames, plain.source_fps) == (
        (1,),
        "head",
        129,
        None,
    )
    assert plain.resolution == (960, 544)


def test_target_frames_rounded_down_with_warning(caplog):
    with caplog.at_level(logging.WARNING):
        spec = _parse(None, _video(target_frames=[24, 1, 121, 25, 8])).datasets[0]
    assert spec.target_frames == (1, 5, 21, 25, 121)
    assert "rounded down to 4k+1" in caplog.text and "datasets[0].target_frames" in caplog.text
    assert [round_to_4k1(n) for n in (1, 4, 5, 8, 9, 120, 121)] == [1, 1, 5, 5, 9, 117, 121]


@pytest.mark.parametrize(
    ("dataset", "needles"),
    [
        (_video(target_frames=[0, 5]), ["datasets[1].target_frames", "4k+1"]),
        (
            _video(frame_extraction="tail"),
            ["datasets[1].frame_extraction", "'tail'", "head, chunk, slide, uniform, full"],
        ),
        (_video(frame_stride=0), ["datasets[1].frame_stride", ">= 1"]),
        (_video(source_fps=-3.0), ["datasets[1].source_fps", "> 0"]),
        (_image(batch_size=True), ["datasets[1].batch_size", "integer"]),
        (_image(enable_bucket=1), ["datasets[1].enable_bucket", "true or false"]),
        (_image(resolution=[512]), ["datasets[1].resolution", "[width, height]"]),
        (_image(resolution=[500, 500]), ["datasets[1].resolution", "multiples of 16", "[496, 496]"]),
        (
            _image(resolutoin=512),
            ["datasets[1]", "unknown key 'resolutoin'", "did you mean 'resolution'", "valid keys"],
        ),
        (_image(target_frames=[5]), ["datasets[1].target_frames", "only valid for video datasets"]),
        (_image(control_directory="ctl"), ["datasets[1].control_directory", "not supported"]),
        (_image(multiple_target=True), ["datasets[1].multiple_target"]),
        ({"caption_extension": ".txt"}, ["datasets[1]", "exactly one of", "image_directory", "video_jsonl_file"]),
        (_image(video_directory="v"), ["datasets[1]", "exactly one of", "found image_directory, video_directory"]),
        ({"image_directory": "x"}, ["datasets[1].caption_extension", "required"]),
        ({"video_jsonl_file": "v.jsonl"}, ["datasets[1].cache_directory", "required for video_jsonl_file"]),
        (_image("a", cache_directory="shared"), ["datasets[1].cache_directory", "datasets[0]", "its own"]),
    ],
)
def test_invalid_dataset_values(dataset, needles):
    with pytest.raises(UserError) as info:
        _parse(None, _image("first", cache_directory="shared"), dataset)
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message


def test_general_errors():
    with pytest.raises(UserError, match=r"general: unknown key 'bacth_size' \(did you mean 'batch_size'\?\)"):
        _parse({"bacth_size": 2}, _image())
    with pytest.raises(UserError, match=r"general\.cache_directory: not allowed in \[general\]"):
        _parse({"cache_directory": "c"}, _image())
    with pytest.raises(UserError, match="top level: unknown key 'dataset'"):
        parse_dataset_config({"dataset": [_image()]})
    with pytest.raises(UserError, match="at least one"):
        parse_dataset_config({"general": {}})


def test_same_default_cache_directory_rejected():
    with pytest.raises(UserError, match=r"datasets\[1\]\.cache_directory: media is also the cache directory"):
        _parse(None, _image("media"), _video("media"))


def test_ignored_musubi_keys_warn(caplog):
    with caplog.at_level(logging.WARNING):
        spec = _parse(None, _video(fp_latent_window_size=9, multiple_target=False)).datasets[0]
    assert spec.kind == "video"
    assert "fp_latent_window_size" in caplog.text and "ignored" in caplog.text


def test_source_fps_accepts_int_and_uniform_sample():
    spec = _parse(None, _video(source_fps=30, frame_extraction="uniform", frame_sample=4)).datasets[0]
    assert spec.source_fps == 30.0 and isinstance(spec.source_fps, float)


def test_file_errors(tmp_path):
    with pytest.raises(UserError, match="not found"):
        load_dataset_config(tmp_path / "missing.toml")
    bad = _write(tmp_path / "bad.toml", "[general\nresolution = 1")
    with pytest.raises(UserError, match="bad.toml is not valid TOML"):
        load_dataset_config(bad)
    with pytest.raises(UserError, match=r"must end in \.toml or \.json"):
        load_dataset_config(_write(tmp_path / "ds.yaml", "x: 1"))
    unknown = _write(tmp_path / "u.toml", '[[datasets]]\nimage_directory = "x"\ncaption_extension = ".txt"\nfoo = 1\n')
    with pytest.raises(UserError, match=r"u\.toml: datasets\[0\]: unknown key 'foo'"):
        load_dataset_config(unknown)


def test_json_config(tmp_path):
    path = _write(tmp_path / "ds.json", json.dumps({"datasets": [_image(str(tmp_path / "i"), resolution=[640, 480])]}))
    assert load_dataset_config(path).datasets[0].resolution == (640, 480)


# ------------------------------------------------------------------------------------------------------------
# Items
# ------------------------------------------------------------------------------------------------------------


def _spec(**table) -> DatasetSpec:
    return parse_dataset_config({"datasets": [table]}).datasets[0]


def test_directory_items_keys_include_extension(tmp_path):
    for name in ("cat.jpg", "cat.png", "Dog.WEBP", "notes.md", "clip.mp4"):
        _write(tmp_path / name, "x")
    _write(tmp_path / "cat.txt", "  a cat \n")
    _write(tmp_path / "Dog.txt", "a dog")
    items = iter_items(_spec(image_directory=str(tmp_path), caption_extension=".txt"))
    assert [i.key for i in items] == ["Dog.WEBP", "cat.jpg", "cat.png"]
    assert [i.caption for i in items] == ["a dog", "a cat", "a cat"]
    assert {i.kind for i in items} == {"image"} and items[0].path == tmp_path / "Dog.WEBP"
    assert len({i.key for i in items}) == 3  # musubi defect #19: cat.jpg and cat.png no longer collide


def test_directory_missing_caption_is_an_error(tmp_path):
    _write(tmp_path / "a.mp4", "x")
    _write(tmp_path / "b.mp4", "x")
    _write(tmp_path / "a.caption", "ok")
    spec = _spec(video_directory=str(tmp_path), caption_extension=".caption")
    with pytest.raises(UserError, match=r"datasets\[0\]: 1 video\(s\) .* missing .*b\.caption"):
        iter_items(spec)


def test_directory_errors(tmp_path):
    with pytest.raises(UserError, match="directory .* not found"):
        iter_items(_spec(image_directory=str(tmp_path / "nope"), caption_extension=".txt"))
    with pytest.raises(UserError, match="no images found"):
        iter_items(_spec(image_directory=str(tmp_path), caption_extension=".txt"))


def _jsonl(tmp_path: Path, lines: list) -> DatasetSpec:
    text = "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines)
    path = _write(tmp_path / "list.jsonl", text + "\n")
    return _spec(video_jsonl_file=str(path), cache_directory=str(tmp_path / "cache"))


def test_jsonl_items_and_name_collisions(tmp_path):
    for rel in ("a/clip.mp4", "b/clip.mp4", "c/other.MOV"):
        _write(tmp_path / rel, "x")
    lines = [
        {"video_path": str(tmp_path / "a/clip.mp4"), "caption": " first ", "extra": 1},
        "",
        {"video_path": str(tmp_path / "b/clip.mp4"), "caption": "second"},
        {"video_path": str(tmp_path / "c/other.MOV"), "caption": "third"},
    ]
    items = iter_items(_jsonl(tmp_path, lines))
    keys = [i.key for i in items]
    assert keys[2] == "other.MOV" and keys[0].startswith("clip.mp4-") and keys[1].startswith("clip.mp4-")
    assert keys[0] != keys[1] and len(keys[0]) == len("clip.mp4-") + 8
    assert [i.caption for i in items] == ["first", "second", "third"]
    assert keys == [i.key for i in iter_items(_jsonl(tmp_path, lines))]  # stable


@pytest.mark.parametrize(
    ("line", "needle"),
    [
        ("{not json", "list.jsonl:1: invalid JSON"),
        ({"video_path": "VID"}, "list.jsonl:1: missing 'caption'"),
        ({"image_path": "VID", "caption": "x"}, "missing 'video_path'"),
        ({"video_path": "VID", "caption": "x", "control_path": "c.mp4"}, "'control_path' is not supported"),
        ({"video_path": "MISSING", "caption": "x"}, "1 media file(s) not found"),
        ({"video_path": "DIR", "caption": "x"}, "directories of frames are not supported"),
        ({"video_path": "TXT", "caption": "x"}, "is not a video file; valid extensions"),
    ],
)
def test_jsonl_errors(tmp_path, line, needle):
    paths = {
        "VID": tmp_path / "v.mp4",
        "MISSING": tmp_path / "gone.mp4",
        "DIR": tmp_path / "frames",
        "TXT": tmp_path / "t.txt",
    }
    _write(paths["VID"], "x")
    _write(paths["TXT"], "x")
    paths["DIR"].mkdir()
    if isinstance(line, dict):
        line = {k: str(paths.get(v, v)) for k, v in line.items()}
    with pytest.raises(UserError) as info:
        iter_items(_jsonl(tmp_path, [line]))
    assert needle in str(info.value)


def test_jsonl_duplicate_path(tmp_path):
    _write(tmp_path / "v.mp4", "x")
    line = {"video_path": str(tmp_path / "v.mp4"), "caption": "x"}
    with pytest.raises(UserError, match=r"listed more than once: .*lines 1, 2"):
        iter_items(_jsonl(tmp_path, [line, line]))


# ------------------------------------------------------------------------------------------------------------
# Batching
# ------------------------------------------------------------------------------------------------------------


def test_make_batches_grouping_repeats_and_seed():
    entries = [
        ("a", (512, 512, 1)),
        ("b", (512, 512, 1)),
        ("c", (640, 384, 1)),
        ("d", (512, 512, 5)),
        ("e", (512, 512, 1)),
    ]
    key = lambda e: e[1]  # noqa: E731
    plain = make_batches(entries, key, batch_size=2)
    assert [[e[0] for e in b] for b in plain] == [["a", "b"], ["e"], ["d"], ["c"]]
    repeated = make_batches(entries, key, batch_size=4, num_repeats=2)
    assert [[e[0] for e in b] for b in repeated] == [["a", "a", "b", "b"], ["e", "e"], ["d", "d"], ["c", "c"]]
    shuffled = make_batches(entries, key, batch_size=2, num_repeats=3, seed=7)
    assert shuffled == make_batches(entries, key, batch_size=2, num_repeats=3, seed=7)
    assert shuffled != make_batches(entries, key, batch_size=2, num_repeats=3, seed=8)
    assert all(len({key(e) for e in b}) == 1 and len(b) <= 2 for b in shuffled)
    assert sorted(e[0] for b in shuffled for e in b) == sorted([e[0] for e in entries] * 3)
    with pytest.raises(ValueError):
        make_batches(entries, key, batch_size=0)
