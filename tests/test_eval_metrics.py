"""Metric maths against independent computations: cIoU/gIoU/N-acc/T-acc from their definitions on
random masks of odd sizes, AP50 against hand-ranked lists and a direct pycocotools run, GCG's greedy
mIoU and recall loop on hand-made matrices, METEOR/CIDEr against pycocoevalcap's scorers."""

import contextlib
import io

import numpy as np
import pytest
from pycocotools import mask as mask_utils

from launcher.eval.metrics import (
    IGNORE,
    EmptyTargetCounts,
    IoUAccumulator,
    caption_scores,
    coco_ap50,
    greedy_miou,
    hungarian_miou,
    inter_union,
    recall_matches,
    text_similarity,
)


def _random_masks(rng, n):
    out = []
    for _ in range(n):
        h, w = int(rng.integers(5, 40)) * 2 + 1, int(rng.integers(5, 40)) * 2 + 1  # odd sizes
        empty_gt, empty_pred = rng.random() < 0.2, rng.random() < 0.2
        gt = (rng.random((h, w)) < 0.3) & (not empty_gt)
        pred = (rng.random((h, w)) < 0.3) & (not empty_pred)
        out.append((pred, gt.astype(np.uint8)))
    return out


def test_ciou_and_giou_follow_their_definitions_on_random_masks():
    rng = np.random.default_rng(0)
    pairs = _random_masks(rng, 40)
    acc = IoUAccumulator()
    for pred, gt in pairs:
        acc.add(*inter_union(pred, gt))
    inter = [np.logical_and(p, g).sum() for p, g in pairs]
    union = [np.logical_or(p, g).sum() for p, g in pairs]
    per_expr = [1.0 if u == 0 else i / u for i, u in zip(inter, union)]  # both empty: IoU 1
    assert any(u == 0 for u in union) and any(g.any() and not p.any() for p, g in pairs)
    assert acc.ciou == pytest.approx(sum(inter) / sum(union), rel=1e-9)
    assert acc.giou == pytest.approx(np.mean(per_expr), rel=1e-4)  # LISA's 1e-5 guards
    assert acc.n == 40


def test_ignored_target_pixels_count_in_neither_intersection_nor_union():
    gt = np.zeros((7, 9), np.uint8)
    gt[1:4, 1:4] = 1  # 9 target pixels
    gt[5:7, :] = IGNORE
    pred = np.zeros((7, 9), bool)
    pred[2:7, 2:5] = True  # 15 pixels: 6 on ignored rows, 9 counted, 4 of those on the target
    assert inter_union(pred, gt) == (4.0, 9.0 + 9.0 - 4.0)


def test_n_acc_and_t_acc_follow_their_definitions():
    rng = np.random.default_rng(1)
    gt_empty, pred_empty = rng.random(50) < 0.4, rng.random(50) < 0.3
    counts = EmptyTargetCounts()
    for g, p in zip(gt_empty, pred_empty):
        counts.add(bool(g), bool(p))
    assert counts.n_acc == pytest.approx(np.mean(pred_empty[gt_empty]))  # no-target samples rejected
    assert counts.t_acc == pytest.approx(np.mean(~pred_empty[~gt_empty]))  # target samples answered
    assert EmptyTargetCounts().n_acc is None


def _box_image(gt, dt, scores):
    return {"size": [40, 40], "gt": gt, "dt": dt, "scores": scores}


def test_box_ap50_of_a_hand_ranked_list():
    # ranked: TP (0.9), FP (0.8), TP (0.7) over 2 targets: precision 1 up to recall 0.5, then 2/3
    images = [
        _box_image([[0, 0, 10, 10]], [[0, 0, 10, 9], [20, 20, 10, 10]], [0.9, 0.8]),
        _box_image([[5, 5, 10, 10]], [[5, 5, 10, 10]], [0.7]),
    ]
    assert coco_ap50(images, "bbox") == pytest.approx((51 * 1.0 + 50 * 2 / 3) / 101)


def test_each_target_is_taken_once_and_a_box_on_an_empty_image_is_a_false_positive():
    one = _box_image([[0, 0, 10, 10]], [[0, 0, 10, 9], [1, 0, 9, 10]], [0.6, 0.9])  # 0.9 hits, 0.6 duplicate
    assert coco_ap50([one], "bbox") == pytest.approx(1.0)  # the duplicate ranks below the only target's hit
    empty = _box_image([], [[0, 0, 5, 5]], [0.95])
    assert coco_ap50([one, empty], "bbox") == pytest.approx(0.5)  # ranked first: precision 1/2 at recall 1


def test_segm_ap50_equals_a_direct_cocoeval_run_with_constant_scores():
    rng = np.random.default_rng(2)
    images, gts, dts, infos = [], [], [], []
    for i in range(3):
        h, w = 31 + 2 * i, 45
        g = [np.asfortranarray((rng.random((h, w)) < 0.5).astype(np.uint8)) for _ in range(2)]
        d = [np.asfortranarray(g[0]), np.asfortranarray((rng.random((h, w)) < 0.5).astype(np.uint8))]
        rle = [mask_utils.encode(m) for m in g], [mask_utils.encode(m) for m in d]
        images.append({"size": [h, w], "gt": [{"size": r["size"], "counts": r["counts"].decode()} for r in rle[0]],
                       "dt": [{"size": r["size"], "counts": r["counts"].decode()} for r in rle[1]]})
        infos.append({"id": i, "height": h, "width": w})
        gts += [{"id": len(gts) + k + 1, "image_id": i, "category_id": 1, "iscrowd": 0, "segmentation": r,
                 "area": float(mask_utils.area(r)), "bbox": list(mask_utils.toBbox(r))} for k, r in enumerate(rle[0])]
        dts += [{"image_id": i, "category_id": 1, "score": 1.0, "segmentation": r} for r in rle[1]]
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO()
        gt.dataset = {"images": infos, "annotations": gts, "categories": [{"id": 1}]}
        gt.createIndex()
        ev = COCOeval(gt, gt.loadRes(dts), "segm")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert coco_ap50(images, "segm") == pytest.approx(ev.stats[1])
    assert 0 < ev.stats[1] < 1


def test_greedy_miou_takes_the_largest_pair_first_hungarian_the_best_total():
    iou = np.array([[0.6, 0.5], [0.55, 0.1]])
    assert greedy_miou(iou) == pytest.approx((0.6 + 0.1) / 2)
    assert hungarian_miou(iou) == pytest.approx((0.5 + 0.55) / 2)
    assert greedy_miou(np.array([[0.7, 0.0, 0.0]])) == pytest.approx(0.7)  # misses are not penalised
    assert greedy_miou(np.zeros((2, 2))) == 0.0


def test_recall_stops_at_the_first_pair_below_either_threshold():
    iou = np.array([[0.9, 0.0], [0.0, 0.6]])  # gt x pred
    assert recall_matches(iou, None) == 2
    sim = np.array([[0.2, 0.0], [0.0, 0.9]])  # the best-IoU pair has dissimilar text: stop there
    assert recall_matches(iou, sim) == 0
    sim = np.array([[0.8, 0.0], [0.0, 0.3]])
    assert recall_matches(iou, sim) == 1


def test_text_similarity_is_one_for_equal_phrases_and_zero_for_disjoint_words():
    sim = text_similarity(["red box", "blue circle"], ["red box", "green thing"])
    assert sim[0, 0] == pytest.approx(1.0) and sim[1, 1] == 0.0 and 0 < sim[0, 1] + 1 <= 1 + 1e-9


@pytest.mark.slow
def test_meteor_and_cider_equal_pycocoevalcap_and_a_perfect_caption_scores_cider_10():
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.meteor.meteor import Meteor
    from pycocoevalcap.tokenizer.ptbtokenizer import PTBTokenizer

    refs = {"a": ["A red box beside a blue box."], "b": ["Two green circles on grass."], "c": ["A cat sleeps on a sofa."]}
    hyps = {"a": "a red box next to a box", "b": "two green circles on the grass", "c": "a dog on a sofa"}
    got = caption_scores(refs, hyps)
    tok = PTBTokenizer()
    gts = tok.tokenize({k: [{"caption": c} for c in v] for k, v in refs.items()})
    res = tok.tokenize({k: [{"caption": v}] for k, v in hyps.items()})
    assert got["METEOR"] == pytest.approx(Meteor().compute_score(gts, res)[0])
    assert got["CIDEr"] == pytest.approx(Cider().compute_score(gts, res)[0])
    perfect = caption_scores(refs, {k: v[0] for k, v in refs.items()})
    assert perfect["CIDEr"] == pytest.approx(10.0)  # CIDEr-D's x10 scale, every n-gram matched
    assert perfect["METEOR"] > got["METEOR"]
