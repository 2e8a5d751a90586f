"""Local-feature re-ranking (keypoints.py, rerank.py): RootSIFT and RANSAC on constructed images, the
fusion's calibration on constructed scores, and that the fusion is never fitted on test photos."""
import cv2
import json

import numpy as np
import pytest

from whaleid.preprocess import keypoints
from whaleid.similarity import fusion, local as rerank


def pattern(seed: int, size=(360, 480)) -> np.ndarray:
    """A textured grey image: random ellipses and bars of random grey levels, lightly blurred."""
    rng = np.random.default_rng(seed)
    img = np.full(size, 128, np.uint8)
    for _ in range(120):
        centre = (int(rng.integers(0, size[1])), int(rng.integers(0, size[0])))
        axes = (int(rng.integers(4, 30)), int(rng.integers(4, 30)))
        cv2.ellipse(img, centre, axes, float(rng.uniform(0, 180)), 0, 360, int(rng.integers(0, 256)), -1)
    return cv2.GaussianBlur(img, (0, 0), 1.0)


def rotated_scaled(img: np.ndarray, degrees: float, scale: float) -> np.ndarray:
    h, w = img.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, scale)
    return cv2.warpAffine(img, m, (w, h), borderValue=128)


@pytest.mark.parametrize("geometry", ["homography", "similarity"])
def test_a_pattern_matches_its_rotated_scaled_copy_and_not_another_pattern(geometry):
    a, b = pattern(1), pattern(2)
    copy = rotated_scaled(a, 25, 0.8)
    matcher = rerank.Matcher(False, 0.8, geometry, 8.0)

    def feats(img):
        pts, desc = keypoints.features(img, "sift", 300)
        assert desc.dtype == np.uint8 and len(pts) > 100
        return pts.astype(np.float32), matcher.prepare(desc)

    fa, fcopy, fb = feats(a), feats(copy), feats(b)
    same, qxy, gxy = matcher.match(fa, fcopy)
    other, _, _ = matcher.match(fa, fb)
    assert same >= 40, same
    assert other <= 8, other
    # the inliers obey the transform that made the copy
    h, w = a.shape
    m = cv2.getRotationMatrix2D((w / 2, h / 2), 25, 0.8)
    moved = qxy @ m[:, :2].T + m[:, 2]
    assert np.median(np.linalg.norm(moved - gxy, axis=1)) < 3


def test_without_geometry_every_ratio_test_match_counts():
    a = pattern(6)
    fa = keypoints.features(a, "sift", 300)
    fc = keypoints.features(rotated_scaled(a, 10, 0.9), "sift", 300)
    prep = [(f[0].astype(np.float32), keypoints.as_float(f[1])) for f in (fa, fc)]
    qi, _ = rerank.ratio_matches(prep[0][1], prep[1][1], False, 0.8)
    n, qxy, _ = rerank.Matcher(False, 0.8, "none", 8.0).match(*prep)
    assert n == len(qi) == len(qxy) and n >= rerank.Matcher(False, 0.8, "homography", 8.0).match(*prep)[0]


def test_root_sift_is_unit_length_and_survives_uint8_storage():
    _, desc = keypoints.features(pattern(3), "sift", 50)
    back = keypoints.as_float(desc)
    assert np.allclose(np.linalg.norm(back, axis=1), 1, atol=1e-4)
    detector = cv2.SIFT_create(nfeatures=50)
    _, raw = detector.detectAndCompute(pattern(3), None)
    exact = keypoints.root_sift(raw)
    assert np.allclose(np.linalg.norm(exact, axis=1), 1, atol=1e-3)
    # each stored descriptor is within the rounding (1/512 steps) of a full-precision one
    nearest = np.sqrt(np.maximum(0, 2 - 2 * back @ exact.T)).min(axis=1)
    assert np.median(nearest) < 0.01 and nearest.max() < 0.02, nearest


def test_orb_features_match_a_rotated_copy_too():
    method = "orb"
    a = pattern(4)
    copy = rotated_scaled(a, 15, 0.9)
    matcher = rerank.Matcher(True, 0.8, "homography", 8.0)
    fa, fc, fb = (keypoints.features(x, method, 300) for x in (a, copy, pattern(5)))
    same = matcher.match((fa[0].astype(np.float32), fa[1]), (fc[0].astype(np.float32), fc[1]))[0]
    other = matcher.match((fa[0].astype(np.float32), fa[1]), (fb[0].astype(np.float32), fb[1]))[0]
    assert same >= 20 and other <= 8, (same, other)


def test_logistic_calibration_on_constructed_scores():
    rng = np.random.default_rng(0)
    x = rng.uniform(0, 1, 4000)
    truth_a, truth_b = 10.0, -6.0
    y = rng.uniform(size=x.size) < fusion.sigmoid(truth_a * x + truth_b)
    a, b = fusion.fit_logistic(x, y)
    assert abs(a - truth_a) < 1.5 and abs(b - truth_b) < 1.0, (a, b)
    # separable data: finite weights, probabilities in the right order
    a, b = fusion.fit_logistic([0, 0.1, 0.2, 0.8, 0.9, 1.0], [0, 0, 0, 1, 1, 1])
    assert np.isfinite(a) and a > 0 and fusion.sigmoid(a * 0.9 + b) > 0.8 > 0.2 > fusion.sigmoid(a * 0.1 + b)
    # one class only: the (clipped) prior, whatever x
    a, b = fusion.fit_logistic([0.2, 0.5], [0, 0])
    assert a == 0 and fusion.sigmoid(b) == pytest.approx(1e-3)


def constructed_queries(n=200, ids=30, seed=0):
    """Rankings of 10 ids per query where the embedding puts the truth at a random rank and the local
    score (inliers) is high for the truth: fusion must lift the truth to the top."""
    rng = np.random.default_rng(seed)
    names, truths, rankings, inliers = [], [], [], []
    for q in range(n):
        labels = [f"id{i}" for i in rng.choice(ids, 10, replace=False)]
        truth = labels[int(rng.integers(0, 10))]
        scores = sorted(rng.uniform(0.5, 0.9, 10), reverse=True)
        counts = np.array([rng.integers(25, 60) if lab == truth else rng.integers(0, 9) for lab in labels], np.float32)
        names.append(f"q{q}.jpg")
        truths.append(truth)
        rankings.append((labels, list(scores)))
        inliers.append(counts)
    return names, truths, rankings, inliers


def test_fusion_lifts_verified_ids_and_is_cross_fitted():
    names, truths, rankings, inliers = constructed_queries()
    fitted = fusion.fit(rankings, inliers, truths, 10)
    assert fitted.pairs == 2000 and fitted.same == 200 and fitted.local[0] > 0
    fused = fusion.cross_fitted(rankings, inliers, truths, names, 10, 5)
    assert np.mean([labels[0] == t for (labels, _), t in zip(fused, truths)]) > 0.95
    assert np.mean([labels[0] == t for (labels, _), t in zip(rankings, truths)]) < 0.3
    # a query's own label never enters the fusion that scores it: relabelling it changes nothing of its own
    changed = list(truths)
    changed[7] = "nobody"
    again = fusion.cross_fitted(rankings, inliers, changed, names, 10, 5)
    assert again[7] == fused[7]


def test_local_fusion_ranks_by_inliers_and_breaks_ties_by_the_embedding():
    """rerank.fusion = local: the candidate with most inliers first whatever the embedding says, equal
    inliers in the embedding's order, and the score (for the threshold) never falls as inliers rise."""
    names, truths, rankings, inliers = constructed_queries()
    fitted = fusion.fit(rankings, inliers, truths, 10, mode="local")
    assert fitted.mode == "local" and fusion.Fusion.from_json(fitted.to_json()) == fitted
    labels, scores = ["a", "b", "c", "d"], [0.9, 0.8, 0.7, 0.6]
    got, fused = fusion.fused_ranking((labels, scores), np.array([3.0, 40.0, 3.0, 0.0]), fitted, 4)
    assert got == ["b", "a", "c", "d"] and fused == sorted(fused, reverse=True) and fused[0] > fused[1]
    # a slope fitted <= 0 (flat local evidence) cannot invert the order of the scores
    flat = fusion.Fusion((1.0, 0.0), (-0.5, -2.0), mode="local")
    assert np.all(np.diff(flat.fused([0.5] * 4, [0, 5, 50, 500])) >= 0)
    fused = fusion.cross_fitted(rankings, inliers, truths, names, 10, 5, mode="local")
    assert np.mean([labels[0] == t for (labels, _), t in zip(fused, truths)]) > 0.95


def test_auto_fusion_picks_the_mode_validation_ranks_better():
    """rerank.fusion = auto: local where the inliers name the truth and the embedding does not; average
    where the inliers are noise and the embedding knows; the choice, both figures and the setting are
    recorded, and predict's reading of the calibration asks for auto, not for the mode it chose."""
    # the inliers put the truth first, narrowly; the embedding is confidently wrong on every other query
    rng = np.random.default_rng(3)
    names, truths, rankings, inliers = [], [], [], []
    for q in range(200):
        labels = [f"id{i}" for i in rng.choice(30, 10, replace=False)]
        t = int(rng.integers(1, 10)) if q % 2 == 0 else 0
        scores = np.r_[0.95, np.sort(rng.uniform(0.5, 0.6, 9))[::-1]]
        counts = rng.integers(0, 10, 10).astype(np.float32)
        counts[t] = rng.integers(8, 16)
        counts = np.where(np.arange(10) == t, counts, np.minimum(counts, counts[t] - 1))
        names.append(f"q{q}.jpg"), truths.append(labels[t]), rankings.append((labels, list(scores))), inliers.append(counts)
    mode, top1s, ranked = fusion.choose(rankings, inliers, truths, names, 10, 5)
    assert mode == "local" and top1s["local"] == 1.0 > top1s["average"] and ranked == fusion.cross_fitted(
        rankings, inliers, truths, names, 10, 5, "local")
    # embedding right, inliers ranked against the truth: the average keeps the embedding's order
    names, truths, rankings, inliers = constructed_queries()
    truths = [labels[0] for labels, _ in rankings]
    noise = [rng.permutation(n) for n in inliers]
    noise = [np.where(np.array(labels) == t, 0.0, n) for (labels, _), t, n in zip(rankings, truths, noise)]
    mode, top1s, _ = fusion.choose(rankings, noise, truths, names, 10, 5)
    assert mode == "average" and top1s["average"] > top1s["local"], top1s
    # queries of new individuals do not count towards top-1
    assert fusion.top1([(["a"], [1.0]), (["b"], [1.0])], ["a", "new_whale"]) == 1.0


def test_auto_fusion_is_recorded_for_predict(tmp_path):
    from whaleid.pipeline.stage import StageError
    (tmp_path / "evaluate").mkdir()
    chosen = fusion.Fusion((1.0, 0.0), (1.0, -2.0), 10, 2, mode="local", setting="auto",
                           validation_top1={"average": 0.2, "local": 0.4})
    (tmp_path / "evaluate" / "calibration.json").write_text(json.dumps({"method": "local", **chosen.to_json()}))
    assert fusion.read_calibration(tmp_path, "auto") == chosen
    with pytest.raises(StageError, match="fitted with rerank.fusion = auto"):
        fusion.read_calibration(tmp_path, "local")


def test_predict_refuses_a_calibration_fitted_for_another_fusion(tmp_path):
    from whaleid.pipeline.stage import StageError
    (tmp_path / "evaluate").mkdir()
    fitted = fusion.Fusion((1.0, 0.0), (1.0, -2.0), 10, 2, mode="average")
    (tmp_path / "evaluate" / "calibration.json").write_text(json.dumps({"method": "local", **fitted.to_json()}))
    assert fusion.read_calibration(tmp_path, "average") == fitted
    with pytest.raises(StageError, match="rerank.fusion = average.*--set rerank.fusion=local"):
        fusion.read_calibration(tmp_path, "local")


def test_predict_refuses_to_fuse_without_a_validation_calibration(tmp_path):
    from whaleid.pipeline.stage import StageError
    (tmp_path / "evaluate").mkdir()
    (tmp_path / "evaluate" / "calibration.json").write_text('{"method": "none"}')
    with pytest.raises(StageError, match="run whaleid evaluate"):
        fusion.read_calibration(tmp_path)


def test_batched_scores_equal_photo_by_photo_matching(tmp_path):
    """Reranker.scores matches a query against blocks of photos in one product; the inlier counts must
    be those of matching each photo alone (Reranker.best), mirrored queries included."""
    rng = np.random.default_rng(1)
    images = {"q.jpg": pattern(10)}
    for i in range(5):
        images[f"a{i}.jpg"] = rotated_scaled(pattern(10), rng.uniform(-20, 20), rng.uniform(0.8, 1.1))
        images[f"b{i}.jpg"] = pattern(20 + i)
    images["m.jpg"] = np.ascontiguousarray(pattern(10)[:, ::-1])  # the query's mirror image
    results = []
    for name, img in images.items():
        pts, desc = keypoints.features(img, "sift", 200)
        mp, md = keypoints.features(np.ascontiguousarray(img[:, ::-1]), "sift", 200)
        results.append((name, pts, desc, img.shape[::-1], mp, md))
    path = tmp_path / "k.npz"
    np.savez(path, **keypoints.pack(results, "sift", True))
    store = keypoints.Store(path)
    photos_of = {"A": [f"a{i}.jpg" for i in range(5)], "B": [f"b{i}.jpg" for i in range(5)], "M": ["m.jpg"]}
    for mirror in (False, True):
        r = rerank.Reranker(store, photos_of, rerank.Matcher(False, 0.8, "homography", 8.0), 3, mirror)
        old_block, rerank.BLOCK = rerank.BLOCK, 3  # blocks that cut an id's photos apart
        try:
            got = r.scores(("q.jpg", ["A", "B", "M"]))
        finally:
            rerank.BLOCK = old_block
        expected = [r.best("q.jpg", i)[0] for i in ("A", "B", "M")]
        assert list(got) == expected, (mirror, got, expected)
        assert got[0] >= 30 and got[1] <= 8 and (got[2] >= 30) == mirror


def test_mutual_pairs_are_each_others_nearest_over_the_threshold():
    rng = np.random.default_rng(4)
    sim = rng.uniform(-1, 1, (40, 55))
    qi, gi = rerank.mutual_test(sim, 0.5)
    expected = {(i, j) for i in range(40) for j in range(55)
                if sim[i, j] == sim[i].max() == sim[:, j].max() and sim[i, j] > 0.5}
    assert set(zip(qi.tolist(), gi.tolist())) == expected and len(expected) >= 3
    assert len(rerank.mutual_test(np.zeros((0, 5)), 0.5)[0]) == 0
    # as a Matcher's pairing, batched (Reranker.scores) and pair by pair give the same pairs
    m = rerank.Matcher(False, pairing="mutual", min_similarity=0.5)
    assert [a.tolist() for a in m.pairs(sim)] == [qi.tolist(), gi.tolist()]



def test_aliked_shortlist_is_the_embeddings_best_ids_photos(tmp_path, monkeypatch):
    """ALIKED's glue shortlist is the embedding's order (the first photos of its best ids), even when a later
    photo shares many mutual matches with the query (local.SHORTLIST_SIMILARITY lists XFeat only); the
    shortlist is never longer than asked."""
    rng = np.random.default_rng(7)

    def unit(x):
        return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float16)

    query = unit(rng.normal(size=(150, 128)))
    same = unit(query.astype(np.float32) + 1.1 * unit(rng.normal(size=(150, 128))))  # cosine ~0.65
    assert 0.5 < np.median((query.astype(np.float32) * same.astype(np.float32)).sum(1)) < 0.82
    pts = rng.uniform(0, 300, (150, 2)).astype(np.float16)
    photos = {"q.jpg": query, **{f"o{i}.jpg": unit(rng.normal(size=(150, 128))) for i in range(5)}, "t.jpg": same}
    results = [(name, pts, desc, (300, 300)) for name, desc in photos.items()]
    np.savez(tmp_path / "k.npz", **{**keypoints.pack(results, "sift", False), "method": np.array("aliked")})
    store = keypoints.Store(tmp_path / "k.npz")
    assert store.method == "aliked" and "aliked" not in rerank.SHORTLIST_SIMILARITY
    name_of = {keypoints.as_float(store.get(n)[1]).tobytes(): n for n in photos}
    seen = []

    def fake_glue(q, g, name):
        seen.append(name_of[g[1].tobytes()])
        return np.zeros(0, int), np.zeros(0, int), np.zeros(0, np.float32)

    monkeypatch.setattr(rerank, "glue_matches", fake_glue)
    photos_of = {"A": ["o0.jpg", "o1.jpg", "o2.jpg"], "B": ["o3.jpg", "o4.jpg", "t.jpg"]}  # t.jpg last in order
    glue = rerank.Matcher(False, 0.8, "homography", 12.0, "lightglue", 0.82, 0.7)
    rerank.Reranker(store, photos_of, glue, 2, False, glue_shortlist=2).scores(("q.jpg", ["B", "A"]))
    assert seen == ["o3.jpg", "o4.jpg"]  # B is the embedding's best id: its first two photos, not t.jpg


def test_settings_that_do_not_go_together_are_refused_when_loaded():
    from whaleid.pipeline import config
    with pytest.raises(config.ConfigError, match="set keypoints.method = xfeat"):
        config.load("default", ["rerank.matcher=lighterglue"])
    with pytest.raises(config.ConfigError, match="mutual nearest neighbours compare descriptor vectors"):
        config.load("default", ["rerank.matcher=mutual", "keypoints.method=orb"])
    assert config.get(config.load("default", ["rerank.matcher=mutual", "keypoints.method=xfeat"]), "rerank.matcher") == "mutual"


def query_and_gallery(tmp_path, copies: int, unrelated_from: int, seed: int):
    """SIFT features (tmp_path/k.npz) of q.jpg (pattern 10), `copies` rotated and scaled copies of it
    (a0.jpg, ...) and as many unrelated patterns (b0.jpg, ...): (path, pack's rows)."""
    rng = np.random.default_rng(seed)
    images = {"q.jpg": pattern(10)}
    for i in range(copies):
        images[f"a{i}.jpg"] = rotated_scaled(pattern(10), rng.uniform(-20, 20), rng.uniform(0.8, 1.1))
        images[f"b{i}.jpg"] = pattern(unrelated_from + i)
    results = [(name, *keypoints.features(img, "sift", 200), img.shape[::-1]) for name, img in images.items()]
    path = tmp_path / "k.npz"
    np.savez(path, **keypoints.pack(results, "sift", False))
    return path, results


def test_lighterglue_sees_only_the_shortlisted_photos(tmp_path, monkeypatch):
    """rerank.glue_shortlist: the expensive matcher compares a query only with the gallery photos that
    cheap mutual matching ranks best; the other photos score 0, and 0 means every photo."""
    path, results = query_and_gallery(tmp_path, copies=4, unrelated_from=30, seed=2)
    store = keypoints.Store(path)
    name_of = {keypoints.as_float(store.get(r[0])[1]).tobytes(): r[0] for r in results}
    seen = []

    def fake_glue(q, g, name):  # stands in for LighterGlue: ratio-test matches, and records whom it compared
        assert name == "lighterglue"
        seen.append(name_of[g[1].tobytes()])
        qi, gi = rerank.ratio_test(q[1] @ g[1].T, 0.8)
        return qi, gi, np.ones(len(qi), np.float32)

    monkeypatch.setattr(rerank, "glue_matches", fake_glue)
    photos_of = {"A": [f"a{i}.jpg" for i in range(4)], "B": [f"b{i}.jpg" for i in range(4)]}
    glue = rerank.Matcher(False, 0.8, "homography", 8.0, "lighterglue", 0.8)
    got = rerank.Reranker(store, photos_of, glue, 2, False, glue_shortlist=3).scores(("q.jpg", ["A", "B"]))
    assert len(seen) == 3 and all(n.startswith("a") for n in seen), seen
    assert got[0] >= 30 and got[1] == 0
    seen.clear()
    everything = rerank.Reranker(store, photos_of, glue, 2, False, glue_shortlist=0).scores(("q.jpg", ["A", "B"]))
    assert sorted(seen) == sorted(photos_of["A"] + photos_of["B"]) and everything[0] >= got[0]
    # the shortlist is LighterGlue's only: another matcher ignores it
    mutual = rerank.Matcher(False, 0.8, "homography", 8.0, "ratio")
    assert rerank.Reranker(store, photos_of, mutual, 2, False, glue_shortlist=3).glue_shortlist == 0


def test_a_learned_matchers_pairs_are_kept_across_runs_and_read_back(tmp_path, monkeypatch):
    """WORK/match_cache: a second Reranker on the same work folder scores the query without calling the
    matcher and gets the same inliers; a photo whose features changed is matched again (content-addressed);
    a damaged cache file is recomputed, not trusted; no temp file is left."""
    from whaleid.similarity import match_cache
    path, results = query_and_gallery(tmp_path, copies=3, unrelated_from=40, seed=3)
    calls = []

    def fake_glue(q, g, name):
        calls.append(name)
        qi, gi = rerank.ratio_test(q[1] @ g[1].T, 0.8)
        return qi, gi, np.ones(len(qi), np.float32)

    monkeypatch.setattr(rerank, "glue_matches", fake_glue)
    photos_of = {"A": [f"a{i}.jpg" for i in range(3)], "B": [f"b{i}.jpg" for i in range(3)]}
    glue = rerank.Matcher(False, 0.8, "homography", 8.0, "lightglue", 0.8)
    work = tmp_path / "work"

    def score(store_path):
        r = rerank.Reranker(keypoints.Store(store_path), photos_of, glue, 2, False,
                            cache=match_cache.MatchCache(work, "lightglue"))
        return r.scores(("q.jpg", ["A", "B"])), r.cache

    first, cache = score(path)
    assert len(calls) == 6 and cache.misses == 6 and first[0] >= 30 and first[1] < first[0]
    files = list((work / "match_cache" / "lightglue").rglob("*"))
    assert [f.suffix for f in files if f.is_file()] == [".npz"], files  # one query view, no temp file
    calls.clear()
    again, cache = score(path)
    assert calls == [] and cache.hits == 6 and list(again) == list(first)
    # a changed photo (other keypoints): its pairs are matched again, the others still read back
    results[1] = ("a0.jpg", *keypoints.features(rotated_scaled(pattern(10), 5, 0.9), "sift", 200), (480, 360))
    changed = tmp_path / "k2.npz"
    np.savez(changed, **keypoints.pack(results, "sift", False))
    calls.clear()
    _, cache = score(changed)
    assert len(calls) == 1 and cache.hits == 5
    # a damaged file is not trusted: every pair recomputed, the file rewritten whole
    [f] = [f for f in (work / "match_cache").rglob("*.npz")]
    f.write_bytes(b"not a zip")
    calls.clear()
    fixed, _ = score(path)
    assert len(calls) == 6 and list(fixed) == list(first)
    # a process pool's worker gets a working copy (the lock is not pickled)
    import pickle
    copy = pickle.loads(pickle.dumps(match_cache.MatchCache(work, "lightglue")))
    assert copy.folder == work / "match_cache" / "lightglue" and copy.hits == 0
    # without a work folder nothing is kept
    assert match_cache.MatchCache(None, "lightglue").matches((0, 0, 0), (0, 0, 0), lambda q, g: "computed") == "computed"


def test_glue_confidence_counts_only_the_matchers_confident_matches(tmp_path, monkeypatch):
    """rerank.glue_confidence: matches at or under it never reach RANSAC, so a pair whose matches are all
    unsure scores 0 and the same pair with sure matches scores its inliers; the cached pairs (kept at the
    matcher's own threshold) answer any confidence without matching again."""
    from whaleid.similarity import match_cache
    a = pattern(10)
    results = [(n, *keypoints.features(img, "sift", 200), img.shape[::-1])
               for n, img in (("q.jpg", a), ("g.jpg", rotated_scaled(a, 10, 0.9)))]
    np.savez(tmp_path / "k.npz", **keypoints.pack(results, "sift", False))
    store = keypoints.Store(tmp_path / "k.npz")
    calls = []

    def fake_glue(q, g, name):  # true matches, half of them sure (0.9), half unsure (0.3)
        calls.append(1)
        qi, gi = rerank.ratio_test(q[1] @ g[1].T, 0.8)
        return qi, gi, np.where(np.arange(len(qi)) % 2 == 0, 0.9, 0.3).astype(np.float32)

    monkeypatch.setattr(rerank, "glue_matches", fake_glue)
    cache = match_cache.MatchCache(tmp_path / "work", "lightglue")

    def inliers(confidence):
        m = rerank.Matcher(False, 0.8, "homography", 8.0, "lightglue", 0.8, confidence)
        r = rerank.Reranker(store, {"A": ["g.jpg"]}, m, 1, False, cache=cache)
        return r.scores(("q.jpg", ["A"]))[0]

    everything, sure, none = inliers(0.1), inliers(0.7), inliers(0.95)
    assert everything >= 30 and everything * 0.3 < sure < everything * 0.7 and none == 0
    assert len(calls) == 1  # one matching, three confidences
    from whaleid.pipeline import config
    with pytest.raises(config.ConfigError, match="glue_confidence"):
        config.load("default", ["rerank.glue_confidence=1.5"])


def test_the_logistic_fit_converges_where_plain_newton_oscillates():
    """Confident learned matches leave most (query, id) pairs at 0 inliers: evaluate's validation of nyala
    seed 0 at rerank.glue_confidence 0.7 (these counts) sent plain Newton between slopes of +5,709 and
    -9,708 for ever, and the fusion scored every photo alike. The damped fit finds a positive slope."""
    pos = [0] * 36 + [9, 10, 10, 10, 10, 11, 12, 12, 12, 13, 16, 16, 18, 19, 22, 23, 24, 35, 36, 56]
    neg = [0] * 2179 + [5] * 5 + [6] * 13 + [7] * 9 + [8] * 5 + [9] * 4 + [10] * 2 + [11] * 3 + [12, 14, 16, 34]
    x = fusion.local_feature(pos + neg)
    y = np.array([1] * len(pos) + [0] * len(neg))
    a, b = fusion.fit_logistic(x, y)
    assert 0.5 < a < 5 and -8 < b < -2
    p = fusion.sigmoid(a * x + b)
    assert p[y == 1].mean() > 2 * p[y == 0].mean()  # it separates, which a slope of 0 (or -9,708) does not
