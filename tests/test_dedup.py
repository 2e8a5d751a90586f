import shutil

import imagehash
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from whaleid.preprocess import dedup
from whaleid.data import images


def brute_force(h, k):
    return {(i, j) for i in range(len(h)) for j in range(i + 1, len(h)) if bin(int(h[i]) ^ int(h[j])).count("1") <= k}


@pytest.mark.parametrize("k", [0, 3, 6, 10])
def test_near_pairs_equals_brute_force(k):
    rng = np.random.default_rng(k)
    base = rng.integers(0, 2 ** 63, size=300, dtype=np.uint64)
    planted = []
    for d in range(0, 9):  # near copies at distances 0..8 bits
        bits = rng.choice(64, size=d, replace=False)
        planted.append(base[d] ^ np.uint64(sum(1 << int(b) for b in bits)))
    h = np.concatenate([base, np.array(planted, dtype=np.uint64)])
    got = dedup.near_pairs(h, k, block=37)  # a block size that does not divide len(h)
    assert {tuple(p) for p in got.tolist()} == brute_force(h, k)
    assert (got[:, 0] < got[:, 1]).all()


def _jpeg(path, seed, size=(300, 200), mode="RGB", quality=90):
    rng = np.random.default_rng(seed)
    a = rng.integers(0, 255, (8, 12, 3), dtype=np.uint8)
    img = Image.fromarray(a).resize(size, Image.Resampling.BICUBIC)
    img.convert(mode).save(path, "JPEG", quality=quality)
    return path


def test_hash_image_matches_full_decode_phash(tmp_path):
    for i, (size, mode) in enumerate([((1050, 700), "RGB"), ((3621, 561), "L"), ((365, 102), "RGB"), ((800, 500), "RGB")]):
        p = _jpeg(tmp_path / f"{i}.jpg", i, size, mode)
        h, got_size, got_mode = dedup.hash_image(p)
        full = imagehash.phash(Image.open(p))
        assert bin(h ^ int(str(full), 16)).count("1") <= 2  # reduced decode: same hash up to a bit or two
        assert got_size == size and got_mode == mode
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"nope")
    with pytest.raises(images.BadImage):
        dedup.hash_image(bad)


def test_verification_accepts_copies_and_rejects_other_photos(tmp_path):
    a = _jpeg(tmp_path / "a.jpg", 1)
    b = tmp_path / "b.jpg"
    Image.open(a).save(b, "JPEG", quality=60)
    c = tmp_path / "c.jpg"
    Image.open(a).resize((210, 140)).convert("L").save(c, "JPEG")
    other = _jpeg(tmp_path / "o.jpg", 2)
    wide = _jpeg(tmp_path / "w.jpg", 1, size=(400, 200))
    ok = lambda x, y: dedup.same_pixels((x, y, Image.open(x).size, Image.open(y).size), 0.1)  # noqa: E731
    assert ok(a, b) and ok(a, c)
    assert not ok(a, other) and not ok(a, wide)


def _photos(spec):
    return pd.DataFrame([(n, f, 100 * (1 + big), 100) for n, f, big in spec],
                        columns=["Image", "folder", "width", "height"])


def test_relabel_cases():
    photos = _photos([("a1", "train", 1), ("a2", "train", 0),          # same id: copy dropped
                      ("b1", "train", 0), ("b2", "train", 0),          # conflict: reported, kept
                      ("c1", "train", 0), ("t1", "test", 0),           # test duplicates a train photo
                      ("n1", "train", 0), ("t2", "test", 0),           # duplicate of a new_whale
                      ("m1", "train", 0), ("m2", "train", 1), ("t3", "test", 0)])  # new_whale + known id
    train = pd.DataFrame({"Image": ["a1", "a2", "b1", "b2", "c1", "n1", "m1", "m2"],
                          "Id": ["w_a", "w_a", "w_b", "w_c", "w_d", "new_whale", "new_whale", "w_m"]})
    groups = [["a1", "a2"], ["b1", "b2"], ["c1", "t1"], ["n1", "t2"], ["m1", "m2", "t3"]]
    conv, known, report = dedup.relabel(photos, train, groups)
    assert "a2" not in set(conv.Image) and "a1" in set(conv.Image)
    assert {"b1", "b2"} <= set(conv.Image)
    assert report[report.conflict].images.tolist() == ["b1 b2"]
    assert dict(zip(known.Image, known.Id)) == {"t1": "w_d", "t3": "w_m"}
    assert "m1" not in set(conv.Image) and conv.set_index("Image").Id["m2"] == "w_m"


def test_synthetic_ground_truth_groups_found_exactly(tiny_set, tmp_path):
    from whaleid.pipeline import config
    from whaleid.stages import ALL
    from whaleid.pipeline.stage import Session
    s = Session(cfg=config.load(None), work=tmp_path / "w", data=tiny_set, stages=ALL, echo=lambda m: None)
    s.run([s.stage("dedup")])
    truth = {frozenset(g.Image) for _, g in pd.read_csv(tiny_set / "duplicates.csv").groupby("group")}
    found = {frozenset(x.split()) for x in pd.read_csv(tmp_path / "w/dedup/dedup_report.csv").images}
    assert found == truth  # precision and recall 1.0
    p2h = pd.read_pickle(tmp_path / "w/dedup/p2h.pickle")
    h2ps = pd.read_pickle(tmp_path / "w/dedup/h2ps.pickle")
    assert all(p in h2ps[p2h[p]] for p in p2h)


def test_real_photos_copies_group_with_their_originals_only(shared_data, tmp_path):
    src = sorted((shared_data / "whales/images").glob("*.jpg"))
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    rows = []
    for k, p in enumerate(src):
        shutil.copy(p, data / "train" / p.name)
        rows.append((p.name, f"w_{k:07d}"))
        img = Image.open(p)
        copies = {"r": img.resize((int(img.width * 0.6), int(img.height * 0.6))),
                  "g": img.convert("L"), "q": img}
        for tag, im in copies.items():
            im.convert("RGB" if tag != "g" else "L").save(data / "test" / f"{tag}_{p.name}", "JPEG",
                                                          quality=70 if tag == "q" else 90)
    pd.DataFrame(rows, columns=["Image", "Id"]).to_csv(data / "train.csv", index=False)
    pd.DataFrame({"Image": sorted(x.name for x in (data / "test").iterdir()), "Id": "new_whale"}).to_csv(
        data / "sample_submission.csv", index=False)
    from whaleid.pipeline import config
    from whaleid.stages import ALL
    from whaleid.pipeline.stage import Session
    s = Session(cfg=config.load(None), work=tmp_path / "w", data=data, stages=ALL, echo=lambda m: None)
    s.run([s.stage("dedup")])
    groups = [set(x.split()) for x in pd.read_csv(tmp_path / "w/dedup/dedup_report.csv").images]
    for p in src:
        mine = [g for g in groups if p.name in g]
        assert len(mine) == 1 and mine[0] == {p.name, f"r_{p.name}", f"g_{p.name}", f"q_{p.name}"}, (p.name, mine)


def test_equal_hashes_of_different_photos_are_checked_on_pixels(tmp_path, monkeypatch):
    # At 33k photos two different whales can share a phash; the pixels decide when dedup.verify is on.
    from whaleid.pipeline import config
    from whaleid.stages import ALL
    from whaleid.pipeline.stage import Session
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    (data / "test").mkdir()
    _jpeg(data / "train/a.jpg", 1)
    _jpeg(data / "train/b.jpg", 2)
    shutil.copy(data / "train/a.jpg", data / "test/c.jpg")
    pd.DataFrame({"Image": ["a.jpg", "b.jpg"], "Id": ["w_1", "w_2"]}).to_csv(data / "train.csv", index=False)
    pd.DataFrame({"Image": ["c.jpg"], "Id": ["new_whale"]}).to_csv(data / "sample_submission.csv", index=False)
    real = dedup.hash_image
    monkeypatch.setattr(dedup, "hash_image", lambda p: (0x0123456789ABCDEF, *real(p)[1:]))
    for verify, expected in ((True, {frozenset({"a.jpg", "c.jpg"})}), (False, {frozenset({"a.jpg", "b.jpg", "c.jpg"})})):
        cfg = config.load(None)
        cfg["dedup"]["verify"] = verify
        s = Session(cfg=cfg, work=tmp_path / f"w{verify}", data=data, stages=ALL, workers=1,
                    echo=lambda m: None)
        s.run([s.stage("dedup")])
        found = {frozenset(x.split()) for x in pd.read_csv(tmp_path / f"w{verify}/dedup/dedup_report.csv").images}
        assert found == expected
