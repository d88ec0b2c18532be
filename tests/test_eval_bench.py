"""Benchmark scoring from shards and a predictions JSONL (`launcher eval --predictions`): predictions at
the SAM frame put back at the original size, perfect predictions score 1, known perturbations give the
hand-computed values, and bad prediction files are refused with the key named."""

import json

import numpy as np
import pytest
from eval_bench import write_bench
from scipy import ndimage

from datapipes.collate import sam_frame_size, sam_masks
from datapipes.schema import decode_mask, encode_mask
from launcher.__main__ import main
from launcher.eval.masks import to_original
from launcher.eval.records import Prediction, read_targets, write_predictions


@pytest.mark.parametrize("hw,frame", [((37, 61), 64), ((45, 31), 64), ((201, 299), 512)])
def test_a_mask_placed_in_the_sam_frame_and_put_back_differs_only_at_its_border(hw, frame):
    rng = np.random.default_rng(hw[0])
    mask = (ndimage.gaussian_filter(rng.random(hw), 3) > 0.5).astype(np.uint8)  # blobs, not noise
    assert 0.1 < mask.mean() < 0.9
    resized = sam_frame_size(*hw, frame)
    in_frame = sam_masks(mask[None], resized, frame).bool()
    back = to_original(in_frame, resized, hw)[0]
    border = ndimage.binary_dilation(mask) & ~ndimage.binary_erosion(mask)
    wrong = back != mask.astype(bool)
    assert wrong.sum() < 0.05 * mask.sum() and not (wrong & ~ndimage.binary_dilation(border)).any()
    # logits: the threshold at 0 after bilinear resizing, as SAM's postprocess_masks
    logits = in_frame.float() * 8 - 4
    assert (to_original(logits, resized, hw)[0] == back).mean() > 0.98


@pytest.fixture(scope="module")
def benches(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    out = {}
    for name, n in (("refcoco", 6), ("grefcoco", 9), ("gcg", 4)):
        folder = root / "shards" / f"{name}_val"
        write_bench(folder, name, n, seed=len(name))
        out[name] = folder
    return out


def _perfect(folder):
    return [Prediction(t.key, t.answer, [m for m in t.masks if m is not None]) for t in read_targets(folder)]


def _score(tmp_path, bench, folder, preds, mode="teacher_forced"):
    path, report = tmp_path / "pred.jsonl", tmp_path / "report.json"
    write_predictions(path, preds)
    assert main(["eval", "--predictions", str(path), "--bench", bench, "--data", str(folder), "--mode", mode,
                 "--report", str(report)]) == 0
    return json.loads(report.read_text())[bench]["val"]


def test_perfect_predictions_score_one_on_each_benchmark(tmp_path, benches):
    ref = _score(tmp_path, "refcoco", benches["refcoco"], _perfect(benches["refcoco"]))
    assert ref["cIoU"] == pytest.approx(1.0) and ref["gIoU"] == pytest.approx(1.0, rel=1e-4) and ref["n"] == 6
    gref = _score(tmp_path, "grefcoco", benches["grefcoco"], _perfect(benches["grefcoco"]), mode="generate")
    assert (gref["cIoU"], gref["N-acc"], gref["T-acc"], gref["n"]) == (pytest.approx(1.0), 1.0, 1.0, 9)
    forced = _score(tmp_path, "grefcoco", benches["grefcoco"], _perfect(benches["grefcoco"]))
    assert forced["n"] == 6 and "N-acc" not in forced  # teacher-forced: the 3 no-target samples show nothing
    gcg = _score(tmp_path, "gcg", benches["gcg"], _perfect(benches["gcg"]))
    assert gcg["AP50"] == pytest.approx(1.0) and gcg["mIoU"] == 1.0 and gcg["MR text-sim:tfidf"] == 1.0


def test_a_known_perturbation_gives_the_hand_computed_scores(tmp_path, benches):
    preds = _perfect(benches["refcoco"])
    targets = {t.key: t for t in read_targets(benches["refcoco"])}
    areas = {k: int(decode_mask(t.masks[0]).sum()) for k, t in targets.items()}
    first = preds[0]
    m = decode_mask(first.masks[0])
    ys, xs = np.nonzero(m)
    m[ys[:5], xs[:5]] = 0  # five target pixels missed
    first.masks = [encode_mask(m)]
    got = _score(tmp_path, "refcoco", benches["refcoco"], preds)
    total = sum(areas.values())
    assert got["cIoU"] == pytest.approx((total - 5) / total)
    a = areas[first.key]
    assert got["gIoU"] == pytest.approx((5 + (a - 5) / a) / 6, rel=1e-4)

    preds = _perfect(benches["grefcoco"])
    empty = next(p for p in preds if not p.masks)
    size = targets_size = next(t for t in read_targets(benches["grefcoco"]) if t.key == empty.key).image_size
    blob = np.zeros(size, np.uint8)
    blob[:3, :4] = 1  # 12 pixels predicted for a sample with no target
    empty.masks = [encode_mask(blob)]
    gt_area = sum(int(decode_mask(r).sum()) for t in read_targets(benches["grefcoco"]) for r in t.masks)
    got = _score(tmp_path, "grefcoco", benches["grefcoco"], preds, mode="generate")
    assert got["N-acc"] == pytest.approx(2 / 3) and got["T-acc"] == 1.0  # 3 no-target samples, one answered
    assert got["cIoU"] == pytest.approx(gt_area / (gt_area + 12))
    assert got["gIoU"] == pytest.approx(8 / 9, rel=1e-4)
    assert targets_size == size


def test_a_prediction_file_with_an_unknown_or_repeated_key_is_refused(tmp_path, benches):
    folder = benches["refcoco"]
    preds = _perfect(folder)
    with pytest.raises(KeyError, match="not_a_sample"):
        _score(tmp_path, "refcoco", folder, [*preds, Prediction("not_a_sample", "", [])])
    with pytest.raises(ValueError, match="predicted twice"):
        _score(tmp_path, "refcoco", folder, [*preds, preds[0]])
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"key": preds[0].key, "masks": [{"size": [3, 3], "counts": 5}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl:1.*compressed RLE"):
        main(["eval", "--predictions", str(bad), "--bench", "refcoco", "--data", str(folder)])


def test_reasonseg_splits_long_and_short_queries_and_drops_ignored_pixels():
    from launcher.eval.records import Target
    from launcher.eval.score import score_referring

    gt, ignore, pred = (np.zeros((9, 11), np.uint8) for _ in range(3))
    gt[:4, :4] = 1  # 16 pixels
    ignore[6:, :] = 1
    pred[:4, :2] = 1  # 8 on the target
    pred[6:, :] = 1  # 33 on the ignore region: not counted

    def pair(key, sentence):
        t = Target(key, "referring", "reasonseg", (9, 11), [encode_mask(gt)], ["x"], [[0, 0, 4, 4]], "[SEG].",
                   source={"is_sentence": sentence}, extra={"ignore": encode_mask(ignore)})
        return Prediction(key, "[SEG].", [encode_mask(pred if sentence else gt)]), t

    got = score_referring([pair("a", True), pair("b", False)])
    assert got["long/cIoU"] == pytest.approx(8 / 16) and got["short/cIoU"] == pytest.approx(1.0)
    assert got["cIoU"] == pytest.approx((8 + 16) / (16 + 16)) and got["n"] == 2


def test_every_benchmark_metric_name_is_one_mlflow_accepts(benches):
    from mlflow.utils.validation import _validate_metric_name  # what the store checks each name with

    from launcher.eval.benchmarks import BENCHMARKS
    from launcher.eval.verb import mlflow_names

    extra = ("n", "mIoU_hungarian", "recall_iou_only", "box_AP50", "samples_per_s", "short/cIoU", "long/gIoU")
    for bench in BENCHMARKS.values():
        names = mlflow_names(bench.name, {sp: dict.fromkeys(bench.headline + extra, 0.5) for sp in bench.splits})
        for name in names:
            _validate_metric_name(name)
    assert "bench/refcocoplus_testA/cIoU" in mlflow_names("refcoco+", {"testA": {"cIoU": 0.5}})
