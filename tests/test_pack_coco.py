"""The karpathy and coco packers on look-alike trees (tests/fake_coco.py) with the real files' quirks."""

import json

import pytest
from fake_coco import write_coco, write_karpathy_coco, write_karpathy_flickr30k
from test_pack import FAST, assert_matches, read_pack

from blip2_dist.data.pack import PackError, pack_coco, pack_karpathy
from blip2_dist.data.pack_cli import main
from blip2_dist.data.reader import parse_sample
from blip2_dist.data.shards import read_manifest


def test_karpathy_coco_images_by_filepath_restval_into_train(tmp_path, capsys):
    fake = write_karpathy_coco(tmp_path / "coco")
    assert (
        main(["karpathy", str(tmp_path / "coco"), "--out", str(tmp_path / "out"), "--workers", "1", "--no-progress"])
        == 0
    )
    assert "dataset_coco.json: 14 images" in capsys.readouterr().out
    samples = assert_matches(tmp_path / "out", fake)  # captions, order, splits and original JPEG bytes
    manifest = read_manifest(tmp_path / "out")
    assert manifest["source"]["file"] == "dataset_coco.json" and "restval -> train" in manifest["source"]["split_rule"]
    assert {len(caps) for _, caps, _ in samples.values()} == {5, 6, 7}
    assert sum(s.startswith("COCO_val2014") for s in fake.order["train"]) > 0  # restval images are train
    # A caption with a line break inside is packed as written and read back as one line.
    image_id = next(i for i, (_, caps) in fake.expected.items() if any("\n" in c for c in caps))
    meta = json.dumps({"image_id": image_id, "captions": samples[image_id][1]}).encode()
    assert "\n" in "".join(samples[image_id][1]) and not any("\n" in c for c in parse_sample({"json": meta}, "k")[1])


def test_karpathy_flickr30k_json_given_and_image_folder(tmp_path):
    fake = write_karpathy_flickr30k(tmp_path / "f30k")
    pack_karpathy(tmp_path / "f30k" / "dataset_flickr30k.json", tmp_path / "out", **FAST)
    assert_matches(tmp_path / "out", fake)
    (tmp_path / "f30k" / "flickr30k-images").rename(tmp_path / "elsewhere")
    with pytest.raises(PackError, match="no image folder .flickr30k-images.*--images DIR"):
        pack_karpathy(tmp_path / "f30k", tmp_path / "out", **FAST)
    pack_karpathy(tmp_path / "f30k", tmp_path / "out", images_dir=tmp_path / "elsewhere", **FAST)
    fake.files = {k: tmp_path / "elsewhere" / v.name for k, v in fake.files.items()}
    assert_matches(tmp_path / "out", fake)
    write_karpathy_coco(tmp_path / "f30k", n=2)  # two Karpathy files in one folder: say which
    with pytest.raises(PackError, match="several Karpathy files"):
        pack_karpathy(tmp_path / "f30k", tmp_path / "out", **FAST)


def test_karpathy_missing_image_names_the_entry(tmp_path):
    fake = write_karpathy_coco(tmp_path / "coco", n=7)
    gone = fake.files[fake.order["test"][0]]
    gone.unlink()
    with pytest.raises(PackError, match=f"{gone}: missing image file"):
        pack_karpathy(tmp_path / "coco", tmp_path / "out", **FAST)
    manifest = pack_karpathy(tmp_path / "coco", tmp_path / "out", skip_bad=True, **FAST)
    assert [s["file"] for s in manifest["skipped"]] == [str(gone)] and "test" not in manifest["splits"]


@pytest.mark.parametrize("year", [2014, 2017])
def test_official_coco_train_val_no_test(tmp_path, year):
    fake = write_coco(tmp_path / "coco", year=year)
    manifest = pack_coco(tmp_path / "coco", tmp_path / "out", **FAST)
    assert_matches(tmp_path / "out", fake)  # captions regrouped per image, in annotation-file order
    assert sorted(manifest["splits"]) == ["train", "val"] and manifest["source"]["year"] == year
    assert "no test split" in manifest["source"]["split_rule"]


def test_official_coco_quirks_are_errors_that_name_the_entry(tmp_path):
    write_coco(tmp_path / "coco", year=2014)
    write_coco(tmp_path / "coco", year=2017)
    with pytest.raises(PackError, match="captions for 2014 and 2017; choose one with --year"):
        pack_coco(tmp_path / "coco", tmp_path / "out", **FAST)
    path = tmp_path / "coco" / "annotations" / "captions_val2017.json"
    data = json.loads(path.read_text())
    lonely = data["images"][0]["file_name"]
    data["annotations"] = [a for a in data["annotations"] if a["image_id"] != data["images"][0]["id"]]
    data["annotations"].append({"image_id": 123456, "id": 1, "caption": "an orphan caption"})
    path.write_text(json.dumps(data))
    with pytest.raises(PackError, match=rf"captions_val2017.json: images\[0\]: {lonely} has no caption"):
        pack_coco(tmp_path / "coco", tmp_path / "out", year=2017, **FAST)
    manifest = pack_coco(tmp_path / "coco", tmp_path / "out", year=2017, skip_bad=True, **FAST)
    reasons = [s["reason"] for s in manifest["skipped"]]
    assert any("image id 123456, which is not in 'images'" in r for r in reasons)
    assert lonely[:-4] not in read_pack(tmp_path / "out")[0]
