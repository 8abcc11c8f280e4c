"""The prepare step: formats, every validation rule, and its outputs."""

import csv
import hashlib
import json
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
from PIL import Image

from avse import cli, pipeline
from avse.data.dataset import PreparedSplit
from avse.data.formats import Caption, read_caption_splits, read_karpathy, read_lines, write_caption_splits
from avse.data.prepare import MAX_LISTED_PROBLEMS, caption_stats, prepare
from avse.data.tokenizer import SPECIAL_TOKENS, learn_wordpiece_vocab, load_tokenizer, train_wordpiece
from avse.errors import DataError
from avse.training.loop import train

from conftest import REPO, TINY, make_config, run
from test_images import jpeg_claiming

SPLITS = ("train", "dev", "test")


def write_jpeg(path: Path, seed: int = 0, size: int = 8) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8)
    cv2.imwrite(str(path), pixels)


def make_raw(root: Path, images_per_split=(3, 2, 2), captions=5) -> tuple[Path, Path]:
    """A tiny dataset in the caption-split layout: returns (caption folder, image folder)."""
    caps_dir, image_dir = root / "caps", root / "images"
    caps_dir.mkdir(parents=True)
    mapping, next_id = {}, 0
    for split, n_images in zip(SPLITS, images_per_split):
        caps, ids = [], []
        for _ in range(n_images):
            mapping[str(next_id)] = f"{next_id:04d}.jpg"
            write_jpeg(image_dir / mapping[str(next_id)], seed=next_id)
            caps += [f"caption {k} of image {next_id} in {split}" for k in range(captions)]
            ids += [str(next_id)] * captions
            next_id += 1
        (caps_dir / f"{split}_caps.txt").write_text("\n".join(caps) + "\n")
        (caps_dir / f"{split}_ids.txt").write_text("\n".join(ids) + "\n")
    (caps_dir / "id_mapping.json").write_text(json.dumps(mapping))
    return caps_dir, image_dir


def config_for(caps_dir: Path, image_dir: Path, **data):
    return make_config({"data": {"dataset": "f30k", "root": str(caps_dir), "images": str(image_dir), "cache_res": 4, **data}})


def read_index(path: Path) -> list[dict]:
    with path.open(newline="") as f:
        return list(csv.DictReader(f))


def run_bad(tmp_path: Path, caps_dir: Path, image_dir: Path, **data) -> str:
    """Prepare into an output folder holding an earlier result; it must stay untouched."""
    out = tmp_path / "prepared"
    out.mkdir(exist_ok=True)
    (out / "earlier.txt").write_text("earlier result")
    with pytest.raises(DataError) as err:
        prepare(config_for(caps_dir, image_dir, **data), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == ["earlier.txt"]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []
    return str(err.value)


def test_prepare_writes_index_cache_and_stats(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path)
    out = tmp_path / "prepared"
    stats = prepare(config_for(caps_dir, image_dir), out, progress=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["dev.csv", "dev_images.npy", "dropped.csv", "stats.json", "test.csv", "test_images.npy", "train.csv", "train_images.npy"])
    rows = read_index(out / "test.csv")
    assert len(rows) == 10
    assert rows[0] == {"image_id": "5", "image_file": "0005.jpg", "image_path": (image_dir / "0005.jpg").as_posix(),
                       "caption": "caption 0 of image 5 in test"}
    cache = np.load(out / "test_images.npy")
    assert cache.shape == (2, 4, 4, 3) and cache.dtype == np.uint8
    expected = cv2.cvtColor(cv2.imread(str(image_dir / "0006.jpg")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(cache[1], cv2.resize(expected, (4, 4), interpolation=cv2.INTER_AREA))
    assert stats["train"]["images"] == 3 and stats["train"]["captions"] == 15
    assert stats["test"]["words_per_caption"]["mean"] == 7.0
    assert json.loads((out / "stats.json").read_text()) == stats


def test_ids_file_with_one_line_per_image(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path)
    (caps_dir / "test_ids.txt").write_text("5\n6\n")
    prepare(config_for(caps_dir, image_dir), tmp_path / "out", progress=False)
    assert [r["image_id"] for r in read_index(tmp_path / "out" / "test.csv")] == ["5"] * 5 + ["6"] * 5


def test_captions_of_an_image_are_grouped_in_first_seen_order(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path)
    (caps_dir / "test_caps.txt").write_text("".join(f"c{i}\n" for i in range(10)))
    (caps_dir / "test_ids.txt").write_text("6\n5\n6\n5\n6\n5\n6\n5\n6\n5\n")
    prepare(config_for(caps_dir, image_dir), tmp_path / "out", progress=False)
    rows = read_index(tmp_path / "out" / "test.csv")
    assert [r["caption"] for r in rows] == ["c0", "c2", "c4", "c6", "c8", "c1", "c3", "c5", "c7", "c9"]


def test_crlf_and_bom_are_accepted(tmp_path):
    path = tmp_path / "caps.txt"
    path.write_bytes(b"\xef\xbb\xbfa dog\r\na cat\r\n")
    assert read_lines(path, []) == ["a dog", "a cat"]


def test_line_counts_differ(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path)
    (caps_dir / "dev_ids.txt").write_text("3\n" * 9)
    message = run_bad(tmp_path, caps_dir, image_dir)
    assert f"{caps_dir / 'dev_ids.txt'}: 9 lines, but dev_caps.txt has 10 captions" in message


def test_id_absent_from_mapping(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path)
    (caps_dir / "test_ids.txt").write_text("5\n" * 5 + "77\n" * 5)
    message = run_bad(tmp_path, caps_dir, image_dir)
    assert f"{caps_dir / 'test_caps.txt'}:6: image id 77 is not in {caps_dir / 'id_mapping.json'}" in message


def test_id_that_is_not_a_number(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path)
    (caps_dir / "test_ids.txt").write_text("5\n" * 5 + "6\n" * 4 + "six\n")
    message = run_bad(tmp_path, caps_dir, image_dir)
    assert f"{caps_dir / 'test_ids.txt'}:10: 'six' is not a non-negative integer image id" in message


def test_missing_image_file(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path)
    (image_dir / "0003.jpg").unlink()
    message = run_bad(tmp_path, caps_dir, image_dir)
    assert f"{image_dir / '0003.jpg'}: image file not found (image id 3, split dev)" in message


def test_undecodable_image(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path)
    (image_dir / "0001.jpg").write_bytes(b"this is not an image")
    message = run_bad(tmp_path, caps_dir, image_dir)
    assert f"{image_dir / '0001.jpg'}: not a decodable image (image id 1, split train)" in message


def test_eval_image_without_five_captions(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path)
    (caps_dir / "test_ids.txt").write_text("5\n" * 6 + "6\n" * 4)
    message = run_bad(tmp_path, caps_dir, image_dir)
    assert "image id 5 has 6 captions in evaluation split test, expected 5" in message
    assert "image id 6 has 4 captions in evaluation split test, expected 5" in message


def test_train_images_may_have_other_caption_counts(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path)
    (caps_dir / "train_ids.txt").write_text("0\n" * 7 + "1\n" * 4 + "2\n" * 4)
    prepare(config_for(caps_dir, image_dir), tmp_path / "out", progress=False)


def test_empty_caption(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path)
    lines = (caps_dir / "train_caps.txt").read_text().splitlines()
    lines[3] = "   "
    (caps_dir / "train_caps.txt").write_text("\n".join(lines) + "\n")
    message = run_bad(tmp_path, caps_dir, image_dir)
    assert f"{caps_dir / 'train_caps.txt'}:4: empty caption" in message


def test_bytes_that_are_not_utf8(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path)
    lines = (caps_dir / "dev_caps.txt").read_bytes().split(b"\n")
    lines[1] = b"caf\xe9 on a street"
    (caps_dir / "dev_caps.txt").write_bytes(b"\n".join(lines))
    message = run_bad(tmp_path, caps_dir, image_dir)
    assert f"{caps_dir / 'dev_caps.txt'}:2: not valid UTF-8 (byte 4: b'\\xe9')" in message


def test_every_problem_reported_at_once_first_twenty_listed(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path, images_per_split=(30, 2, 2))
    for i in range(25):
        (image_dir / f"{i:04d}.jpg").unlink()
    (caps_dir / "test_ids.txt").write_text("32\n" * 6 + "33\n" * 4)
    message = run_bad(tmp_path, caps_dir, image_dir)
    lines = message.splitlines()
    assert lines[0].endswith("27 problems in the input data; nothing was written")
    assert len(lines) == 1 + MAX_LISTED_PROBLEMS + 1
    assert lines[-1] == "  ... and 7 more"


def test_duplicate_and_conflicting_ids_in_mapping(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path)
    text = (caps_dir / "id_mapping.json").read_text()
    (caps_dir / "id_mapping.json").write_text(text.replace('{"0": "0000.jpg"', '{"0": "0000.jpg", "0": "0001.jpg"'))
    assert "image id 0 appears twice" in run_bad(tmp_path, caps_dir, image_dir)
    (caps_dir / "id_mapping.json").write_text(text.replace('"1": "0001.jpg"', '"1": "0000.jpg"'))
    assert "file 0000.jpg is mapped by both image id 0 and 1" in run_bad(tmp_path, caps_dir, image_dir)


def test_empty_split(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path)
    (caps_dir / "dev_caps.txt").write_text("")
    (caps_dir / "dev_ids.txt").write_text("")
    assert "split dev is empty" in run_bad(tmp_path, caps_dir, image_dir)


def test_image_in_two_splits(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path)
    (caps_dir / "test_ids.txt").write_text("5\n" * 5 + "1\n" * 5)  # a training image among the test images
    message = run_bad(tmp_path, caps_dir, image_dir)
    assert message == f"{caps_dir / 'test_caps.txt'}:6: image id 1 is also in split train; an image belongs to one split; nothing was written"


def test_skip_bad_images_drops_their_captions_and_reports(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path)
    (image_dir / "0001.jpg").unlink()
    (image_dir / "0006.jpg").write_bytes(b"garbage")
    out = tmp_path / "out"
    prepare(config_for(caps_dir, image_dir, on_bad_image="skip"), out, progress=False)
    assert {r["image_id"] for r in read_index(out / "train.csv")} == {"0", "2"}
    assert {r["image_id"] for r in read_index(out / "test.csv")} == {"5"}
    dropped = read_index(out / "dropped.csv")
    assert [(d["split"], d["image_id"], d["reason"], d["captions_dropped"]) for d in dropped] == [
        ("train", "1", "image file not found", "5"), ("test", "6", "not a decodable image", "5")]
    train_cache = np.load(out / "train_images.npy")
    assert train_cache.shape[0] == 2
    image_2 = cv2.cvtColor(cv2.imread(str(image_dir / "0002.jpg")), cv2.COLOR_BGR2RGB)
    np.testing.assert_array_equal(train_cache[1], cv2.resize(image_2, (4, 4), interpolation=cv2.INTER_AREA))


@pytest.mark.parametrize("resize", ["stretch", "crop"])
def test_the_cache_holds_whole_images_made_square_per_data_resize(tmp_path, resize):
    caps_dir, image_dir = make_raw(tmp_path)
    cv2.imwrite(str(image_dir / "0000.jpg"), np.random.default_rng(9).integers(0, 255, (8, 16, 3), dtype=np.uint8))  # 2:1
    out = tmp_path / "prepared"
    prepare(config_for(caps_dir, image_dir, resize=resize), out, progress=False)
    wide = cv2.cvtColor(cv2.imread(str(image_dir / "0000.jpg")), cv2.COLOR_BGR2RGB)
    stretched = cv2.resize(wide, (4, 4), interpolation=cv2.INTER_LINEAR)  # every column, squeezed
    cropped = cv2.resize(wide[:, 4:12], (4, 4), interpolation=cv2.INTER_AREA)  # the centre square only
    assert not np.array_equal(stretched, cropped)
    np.testing.assert_array_equal(np.load(out / "train_images.npy")[0], stretched if resize == "stretch" else cropped)


def karpathy_json(path: Path) -> None:
    def image(name, split, n, filepath=None):
        entry = {"filename": name, "split": split, "sentences": [{"raw": f"{name} says {k}"} for k in range(n)]}
        if filepath:
            entry["filepath"] = filepath
        return entry

    path.write_text(json.dumps({"images": [
        image("a.jpg", "train", 5), image("b.jpg", "restval", 5, "val2014"), image("c.jpg", "val", 6),
        image("d.jpg", "test", 5, "val2014"),
    ]}))


def test_karpathy_conversion(tmp_path):
    karpathy_json(tmp_path / "dataset_coco.json")
    raw = read_karpathy(tmp_path / "dataset_coco.json", "coco")
    assert raw.id_to_file == {0: "a.jpg", 1: "val2014/b.jpg", 2: "c.jpg", 3: "val2014/d.jpg"}
    assert [c.image_id for c in raw.splits["train"].captions] == [0] * 5 + [1] * 5
    assert [c.text for c in raw.splits["dev"].captions] == [f"c.jpg says {k}" for k in range(5)]
    assert [c.image_id for c in raw.splits["testall"].captions] == [3] * 5
    # Written as files, read back: the same dataset.
    write_caption_splits(raw, tmp_path / "layout")
    again = read_caption_splits(tmp_path / "layout", ("train", "dev", "testall"))
    assert again.id_to_file == raw.id_to_file
    for name in ("train", "dev", "testall"):
        assert [(c.text, c.image_id) for c in again.splits[name].captions] == [
            (c.text, c.image_id) for c in raw.splits[name].captions]


def test_karpathy_is_detected_and_prepared(tmp_path):
    root = tmp_path / "f30k"
    root.mkdir()
    karpathy_json(root / "dataset_flickr30k.json")
    for name in ("a.jpg", "val2014/b.jpg", "c.jpg", "val2014/d.jpg"):
        write_jpeg(tmp_path / "images" / name)
    out = tmp_path / "out"
    prepare(config_for(root, tmp_path / "images"), out, progress=False)
    assert [r["image_path"] for r in read_index(out / "test.csv")] == [(tmp_path / "images/val2014/d.jpg").as_posix()] * 5


def test_karpathy_bad_entry_is_located(tmp_path):
    (tmp_path / "dataset_flickr30k.json").write_text(json.dumps({"images": [{"filename": "x.jpg", "split": "val"}]}))
    raw = read_karpathy(tmp_path / "dataset_flickr30k.json", "f30k")
    assert str(raw.problems[0]) == f"{tmp_path / 'dataset_flickr30k.json'}: images[0]: expected 'filename', 'split' and 'sentences' with 'raw' texts"


def test_no_dataset_found(tmp_path):
    with pytest.raises(DataError, match="no dataset found"):
        prepare(config_for(tmp_path, tmp_path), tmp_path / "out", progress=False)
    assert not (tmp_path / "out").exists()


def test_real_flickr30k_caption_files(tmp_path, f30k_fixtures):
    """The real Karpathy test and dev captions, with placeholder images named by id_mapping.json."""
    mapping = json.loads((f30k_fixtures / "id_mapping.json").read_text())
    image_dir = tmp_path / "flickr30k-images"
    image_dir.mkdir()
    ok, placeholder = cv2.imencode(".jpg", np.full((8, 8, 3), 127, np.uint8))
    used = {int(line) for split in ("dev", "test") for line in (f30k_fixtures / f"{split}_ids.txt").read_text().split()}
    for image_id in used:
        (image_dir / mapping[str(image_id)]).write_bytes(placeholder.tobytes())
    out = tmp_path / "prepared"
    stats = prepare(config_for(f30k_fixtures, image_dir, cache_res=0), out, progress=False)
    assert (stats["test"]["images"], stats["test"]["captions"]) == (1000, 5000)
    assert (stats["dev"]["images"], stats["dev"]["captions"]) == (1014, 5070)
    test = read_index(out / "test.csv")
    assert test[0]["caption"] == "The man with pierced ears is wearing glasses and an orange hat ."
    assert test[0]["image_file"] == mapping["25"]
    # Caption j belongs to image j // 5, as the recall metrics expect.
    assert all(test[j]["image_id"] == test[5 * (j // 5)]["image_id"] for j in range(5000))
    assert len({test[5 * i]["image_id"] for i in range(1000)}) == 1000


def test_wordpiece_tokenizer_round_trip(tmp_path):
    captions = ["a red circle left of a blue square", "a small green triangle above a yellow cross"] * 20
    train_wordpiece(captions, tmp_path / "tok", vocab_size=200)
    tokenizer = load_tokenizer(tmp_path / "tok")
    ids = tokenizer("a red circle")["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "a red circle"
    assert tokenizer.unk_token_id not in ids


def test_wordpiece_vocabulary_merges_the_most_frequent_pairs_alphabetical_on_ties():
    # Sennrich et al.'s example, with BERT's marks for pieces inside a word.
    vocab = learn_wordpiece_vocab({"low": 5, "lower": 2, "newest": 6, "widest": 3}, vocab_size=40)
    assert vocab == [*SPECIAL_TOKENS, "##e", "##w", "##s", "##t", "##o", "l", "n", "##d", "##i", "w", "##r",
                     "##es", "##est", "##ow", "low", "##ew", "##ewest", "newest", "##dest", "##idest", "widest", "##er", "lower"]
    # The vocabulary size stops the merges; pairs seen once are never merged.
    assert learn_wordpiece_vocab({"low": 5, "lower": 2, "newest": 6, "widest": 3}, vocab_size=18)[-2:] == ["##es", "##est"]
    assert learn_wordpiece_vocab({"ab": 1, "cd": 1}, vocab_size=40) == [*SPECIAL_TOKENS, "##b", "##d", "a", "c"]


def test_the_same_captions_give_the_same_tokenizer_in_every_process(tmp_path, f30k_fixtures):
    script = ("import sys; from pathlib import Path; from avse.data.tokenizer import train_wordpiece; "
              "captions = Path(sys.argv[1]).read_text().splitlines(); train_wordpiece(captions, Path(sys.argv[2]), vocab_size=1000)")
    for hash_seed in ("1", "2"):
        run([sys.executable, "-c", script, str(f30k_fixtures / "test_caps.txt"), str(tmp_path / hash_seed)], cwd=REPO,
            env={"PYTHONHASHSEED": hash_seed})
    first, second = ((tmp_path / seed / "tokenizer.json").read_bytes() for seed in ("1", "2"))
    assert first == second
    tokenizer = load_tokenizer(tmp_path / "1")
    assert len(tokenizer) == 1000 and tokenizer.tokenize("A man in an orange hat") == ["a", "man", "in", "an", "orange", "hat"]


def test_prepare_trains_a_tokenizer_on_train_captions(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path)
    out = tmp_path / "out"
    prepare(config_for(caps_dir, image_dir), out, progress=False,
            tokenizer_builder=lambda captions, folder: train_wordpiece(captions, folder, vocab_size=100))
    tokenizer = load_tokenizer(out / "tokenizer")
    assert "train" in tokenizer.get_vocab() and "dev" not in tokenizer.get_vocab()


def prepare_command(tmp_path: Path, monkeypatch, capsys, caps_dir: Path, image_dir: Path) -> tuple[int, str]:
    """`avse prepare` in a project at `tmp_path` reading the given dataset: (exit status, stderr)."""
    params = {"data": {"dataset": "f30k", "root": str(caps_dir), "images": str(image_dir), "cache_res": 4, "vocab_size": 100}}
    (tmp_path / "params.yaml").write_text(json.dumps(params))
    monkeypatch.chdir(tmp_path)
    status = cli.main(["prepare"])
    return status, capsys.readouterr().err


def test_odd_but_valid_files_are_prepared_by_the_command(tmp_path, monkeypatch, capsys):
    caps_dir, image_dir = make_raw(tmp_path)
    red = np.zeros((8, 8, 3), np.uint8)
    red[..., 2] = 255  # opencv's BGR order
    (image_dir / "0000.jpg").write_bytes(cv2.imencode(".png", red)[1].tobytes())  # a PNG named .jpg
    cv2.imwrite(str(image_dir / "0001.jpg"), np.full((8, 8), 90, np.uint8))  # grayscale
    Image.new("CMYK", (8, 8), (0, 255, 255, 0)).save(image_dir / "0002.jpg", quality=100)  # red in CMYK
    for name in ("train_caps.txt", "train_ids.txt"):  # written on Windows: a byte-order mark and CRLF
        text = (caps_dir / name).read_text()
        (caps_dir / name).write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode())
    status, err = prepare_command(tmp_path, monkeypatch, capsys, caps_dir, image_dir)
    assert status == 0, err
    out = tmp_path / "data" / "prepared" / "f30k"
    rows = read_index(out / "train.csv")
    assert [r["image_id"] for r in rows] == ["0"] * 5 + ["1"] * 5 + ["2"] * 5
    assert rows[0]["caption"] == "caption 0 of image 0 in train"
    cache = np.load(out / "train_images.npy").astype(int)  # RGB rows, whatever the file held
    assert cache[0, ..., 0].min() > 240 and cache[0, ..., 2].max() < 15
    assert (cache[1] == 90).all()
    assert cache[2, ..., 0].mean() > 200 and cache[2, ..., 1].mean() < 60


def written_files(folder: Path) -> list[Path]:
    return [p for p in folder.rglob("*") if not p.is_dir()]


def cut_jpeg(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("damage, error", [
    (lambda caps, images: cut_jpeg(images / "0003.jpg"),
     "{images}/0003.jpg: truncated JPEG (no end-of-image marker) (image id 3, split dev); nothing was written"),
    (lambda caps, images: (images / "0001.jpg").write_bytes(jpeg_claiming(20000)),
     "{images}/0001.jpg: image is 20000x20000 pixels, over the limit of 268435456 pixels (image id 1, split train); nothing was written"),
    (lambda caps, images: (caps / "test_ids.txt").write_text("5\n" * 5 + "0\n" * 5),
     "{caps}/test_caps.txt:6: image id 0 is also in split train; an image belongs to one split; nothing was written"),
    (lambda caps, images: (caps / "dev_ids.txt").write_text("3\n" * 5 + "99\n" * 5),
     "{caps}/dev_caps.txt:6: image id 99 is not in {caps}/id_mapping.json; nothing was written"),
])
def test_bad_input_stops_the_command_with_one_line_naming_the_file(tmp_path, monkeypatch, capsys, damage, error):
    caps_dir, image_dir = make_raw(tmp_path)
    damage(caps_dir, image_dir)
    status, err = prepare_command(tmp_path, monkeypatch, capsys, caps_dir, image_dir)
    assert status == 2
    assert err.splitlines()[-1] == f"error: {error.format(caps=caps_dir, images=image_dir)}"  # after the progress bars
    assert written_files(tmp_path / "data") == []


def test_bad_input_in_a_process_of_its_own(tmp_path):
    """The same through `python -m avse.cli prepare`: exit status 2, one line on stderr, no traceback."""
    caps_dir, image_dir = make_raw(tmp_path)
    cut_jpeg(image_dir / "0003.jpg")
    (tmp_path / "params.yaml").write_text(json.dumps({"data": {"dataset": "f30k", "root": str(caps_dir), "images": str(image_dir)}}))
    result = run([sys.executable, "-m", "avse.cli", "prepare"], cwd=tmp_path, check=False, env={"PYTHONPATH": str(REPO)})
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1] == f"error: {image_dir / '0003.jpg'}: truncated JPEG (no end-of-image marker) (image id 3, split dev); nothing was written"
    assert "Traceback" not in result.stderr and written_files(tmp_path / "data") == []


def add_to_mapping(caps_dir: Path, entries: dict[str, str]) -> None:
    mapping = json.loads((caps_dir / "id_mapping.json").read_text())
    (caps_dir / "id_mapping.json").write_text(json.dumps(mapping | entries))


def refused_by_the_command(tmp_path, monkeypatch, capsys, caps_dir: Path, image_dir: Path) -> str:
    """`avse prepare`'s one line on stderr, after checking that it exits with status 2 and writes nothing."""
    status, err = prepare_command(tmp_path, monkeypatch, capsys, caps_dir, image_dir)
    assert status == 2 and "Traceback" not in err
    assert written_files(tmp_path / "data") == []
    return err.splitlines()[-1]


@pytest.mark.parametrize("name", ["{outside}", "../outside/secret.jpg"], ids=["absolute", "parent"])
def test_a_mapped_name_outside_the_image_folder_is_refused(tmp_path, monkeypatch, capsys, name):
    caps_dir, image_dir = make_raw(tmp_path)
    write_jpeg(tmp_path / "outside" / "secret.jpg")  # a file that exists: the name alone is refused
    name = name.format(outside=tmp_path / "outside" / "secret.jpg")
    add_to_mapping(caps_dir, {"0": name})
    assert refused_by_the_command(tmp_path, monkeypatch, capsys, caps_dir, image_dir) == (
        f"error: {caps_dir / 'id_mapping.json'}: image id 0 maps to {name!r}, which leads outside the image folder "
        "(data.images): names are relative to it, without '..'")


def test_a_nul_byte_in_a_mapped_name_is_refused(tmp_path, monkeypatch, capsys):
    caps_dir, image_dir = make_raw(tmp_path)
    add_to_mapping(caps_dir, {"0": "0000\0.jpg"})
    assert refused_by_the_command(tmp_path, monkeypatch, capsys, caps_dir, image_dir) == (
        f"error: {caps_dir / 'id_mapping.json'}: image id 0 maps to '0000\\x00.jpg', which contains a NUL byte")


def test_mapping_keys_equal_as_numbers_are_refused(tmp_path, monkeypatch, capsys):
    caps_dir, image_dir = make_raw(tmp_path)
    write_jpeg(image_dir / "other.jpg")
    add_to_mapping(caps_dir, {"03": "other.jpg"})  # "3" is there already: image 3 would silently get this file
    assert refused_by_the_command(tmp_path, monkeypatch, capsys, caps_dir, image_dir) == (
        f"error: {caps_dir / 'id_mapping.json'}: image id 3 appears twice (keys '3' and '03')")


@pytest.mark.parametrize("name, message", [
    ("dev_caps.txt", "not a regular file; nothing was written"),
    ("id_mapping.json", "cannot be read (Is a directory)"),
], ids=["caption file", "id mapping"])
def test_a_folder_where_a_data_file_belongs_is_named(tmp_path, monkeypatch, capsys, name, message):
    caps_dir, image_dir = make_raw(tmp_path)
    (caps_dir / name).unlink()
    (caps_dir / name).mkdir()
    assert refused_by_the_command(tmp_path, monkeypatch, capsys, caps_dir, image_dir) == f"error: {caps_dir / name}: {message}"


def without_dev(caps_dir: Path) -> Path:
    """The official repositories' layout: train and test caption files only."""
    for name in ("dev_caps.txt", "dev_ids.txt"):
        (caps_dir / name).unlink()
    return caps_dir


def image_ids(rows: list[dict]) -> list[str]:
    return list(dict.fromkeys(row["image_id"] for row in rows))


def test_a_dev_split_is_carved_from_train_when_the_data_has_none(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path, images_per_split=(8, 0, 2))
    without_dev(caps_dir)
    train_ids = image_ids_of_file(caps_dir / "train_ids.txt")
    out = tmp_path / "prepared"
    stats = prepare(config_for(caps_dir, image_dir, dev_images=3), out, progress=False)
    dev, train = image_ids(read_index(out / "dev.csv")), image_ids(read_index(out / "train.csv"))
    expected = sorted(train_ids, key=lambda i: hashlib.sha256(i.encode()).digest())[:3]
    assert sorted(dev) == sorted(expected) and set(train) == set(train_ids) - set(dev)
    assert dev == [i for i in train_ids if i in dev]  # in train's order, captions kept with their image
    assert len(read_index(out / "dev.csv")) == 15 and stats["dev"]["images"] == 3 and stats["train"]["images"] == 5
    assert stats["dev_carved_from_train"] == 3 and json.loads((out / "stats.json").read_text())["dev_carved_from_train"] == 3
    assert image_ids(read_index(out / "test.csv")) == ["8", "9"]  # never from test
    assert np.load(out / "dev_images.npy").shape == (3, 4, 4, 3)


def image_ids_of_file(path: Path) -> list[str]:
    return list(dict.fromkeys(path.read_text().split()))


def test_the_carved_dev_split_does_not_depend_on_the_file_order_and_grows_by_inclusion(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path, images_per_split=(8, 0, 2))
    without_dev(caps_dir)

    def carve(images: int, out: str) -> set[str]:
        prepare(config_for(caps_dir, image_dir, dev_images=images), tmp_path / out, progress=False)
        return set(image_ids(read_index(tmp_path / out / "dev.csv")))

    two, four = carve(2, "two"), carve(4, "four")
    assert len(two) == 2 and two < four
    for name in ("train_caps.txt", "train_ids.txt"):  # the same images, listed backwards
        lines = (caps_dir / name).read_text().splitlines()
        (caps_dir / name).write_text("\n".join(reversed(lines)) + "\n")
    assert carve(4, "reversed") == four


def test_a_dev_split_in_the_data_is_kept_and_nothing_is_carved(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path)
    stats = prepare(config_for(caps_dir, image_dir, dev_images=2), tmp_path / "prepared", progress=False)
    assert stats["dev_carved_from_train"] == 0 and image_ids(read_index(tmp_path / "prepared" / "dev.csv")) == ["3", "4"]


def test_asking_for_more_dev_images_than_train_can_give_is_one_line(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path, images_per_split=(4, 0, 2))
    without_dev(caps_dir)
    error = run_bad(tmp_path, caps_dir, image_dir, dev_images=4)
    assert error == ("data.dev_images: 4 images asked for the dev split, but train has only 4 images with 5 captions "
                     "(and must keep some): ask for fewer")


def test_without_a_dev_split_training_names_the_parameter_that_carves_one(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path, images_per_split=(4, 0, 2))
    without_dev(caps_dir)
    prepare(config_for(caps_dir, image_dir, dev_images=0), tmp_path / "prepared", progress=False)
    with pytest.raises(DataError, match=r"no prepared split 'dev' \(available: test, train; .*data\.dev_images"):
        PreparedSplit.load(tmp_path / "prepared", "dev")


def test_training_runs_on_a_train_and_test_layout(tmp_path, monkeypatch, caplog):
    caps_dir, image_dir = make_raw(tmp_path, images_per_split=(10, 0, 2))
    without_dev(caps_dir)
    monkeypatch.chdir(tmp_path)
    config = make_config(TINY | {"data": TINY["data"] | {"dataset": "f30k", "root": str(caps_dir), "images": str(image_dir),
                                                       "dev_images": 2, "img_res": 8, "cache_res": 8},
                                 "train": TINY["train"] | {"batch_size": 8, "max_steps": 1}, "tracking": {"enabled": False}})
    pipeline.prepare(config)
    with caplog.at_level("INFO", logger="avse.train"):
        state = train(config, tmp_path / "models")
    assert state.step == 1 and (tmp_path / "models" / "best.pt").exists()
    assert "train: 0 of 40 captions are longer than model.text.max_len 32 word pieces (longest 9)\n" in caplog.text


def test_caption_stats_count_captions_by_length_in_word_pieces(tmp_path):
    texts = ["a dog", "a dog runs", "a dog runs", "two dogs run on grass ."]
    tokenizer = train_wordpiece(texts * 2, tmp_path / "tok", vocab_size=100)  # every word seen twice: one piece each
    stats = caption_stats([Caption(text, i, f"caps.txt:{i + 1}") for i, text in enumerate(texts)], tokenizer)
    pieces = stats["pieces_per_caption"]
    assert pieces.pop("p95") == pytest.approx(7.55)
    assert pieces == {"mean": 5.5, "min": 4, "median": 5.0, "max": 8, "counts": {"4": 1, "5": 2, "8": 1}}  # [CLS] and [SEP] counted
    assert [len(tokenizer.tokenize(text)) + 2 for text in texts] == [4, 5, 5, 8]
    assert "pieces_per_caption" not in caption_stats([Caption("a dog", 0, "caps.txt:1")])


def test_prepare_records_caption_lengths_in_the_pieces_of_its_tokenizer(tmp_path):
    caps_dir, image_dir = make_raw(tmp_path)
    stats = prepare(config_for(caps_dir, image_dir), tmp_path / "out", progress=False,
                    tokenizer_builder=lambda captions, folder: train_wordpiece(captions, folder, vocab_size=100))
    # "caption 3 of image 5 in test": 7 words of one piece each (an unseen word is one [UNK]), + [CLS] and [SEP].
    assert {name: stats[name]["pieces_per_caption"]["counts"] for name in SPLITS} == {"train": {"9": 15}, "dev": {"9": 10}, "test": {"9": 10}}
    assert json.loads((tmp_path / "out" / "stats.json").read_text())["dev"]["pieces_per_caption"]["max"] == 9
    assert "pieces_per_caption" not in prepare(config_for(caps_dir, image_dir), tmp_path / "plain", progress=False)["train"]
