"""Object-level scores (tinyunet.metrics) on hand-counted cases and against brute force."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyunet.errors import ShapeError
from tinyunet.metrics import (
    IOU_THRESHOLDS,
    match_objects,
    object_scores,
    summarize_object_scores,
)


def three_true_two_predicted():
    """True objects of 10, 10 and 5 pixels; predictions with IoU 0.9 and 0.4 against
    the first two, none on the third. Ids need not be consecutive."""
    true = np.zeros((5, 10), np.int32)
    pred = np.zeros((5, 10), np.int32)
    true[0, :] = 1
    true[2, :] = 2
    true[4, :5] = 3
    pred[0, :9] = 7  # 9 of 10 pixels: IoU 0.9
    pred[2, :4] = 3  # 4 of 10 pixels: IoU 0.4
    return pred, true


def test_match_objects_iou_matrix():
    pred, true = three_true_two_predicted()
    overlaps = match_objects(pred, true)
    np.testing.assert_array_equal(overlaps.pred_labels, [3, 7])
    np.testing.assert_array_equal(overlaps.true_labels, [1, 2, 3])
    np.testing.assert_allclose(overlaps.dense(), [[0, 0.4, 0], [0.9, 0, 0]])
    assert overlaps.iou.size == 2  # only the overlapping pairs are stored


def test_hand_counted_scores():
    pred, true = three_true_two_predicted()
    scores = object_scores(pred, true)
    np.testing.assert_allclose(scores["thresholds"], IOU_THRESHOLDS)
    at = {round(t, 2): i for i, t in enumerate(scores["thresholds"])}
    half = at[0.5]
    assert (scores["tp"][half], scores["fp"][half], scores["fn"][half]) == (1, 1, 2)
    assert scores["precision"][half] == pytest.approx(1 / 2)
    assert scores["recall"][half] == pytest.approx(1 / 3)
    assert scores["f1"][half] == pytest.approx(2 / 5)
    assert scores["ap"][half] == pytest.approx(1 / 4)
    # IoU 0.9 is not above 0.9: nothing matches from there on.
    assert (scores["tp"][at[0.9]], scores["fp"][at[0.9]], scores["fn"][at[0.9]]) == (0, 2, 3)
    np.testing.assert_array_equal(scores["tp"], [1] * 8 + [0] * 2)
    assert scores["mean_ap"] == pytest.approx(8 * 0.25 / 10)


def test_iou_exactly_at_threshold_does_not_match():
    true = np.zeros((1, 6), np.int32)
    pred = np.zeros((1, 6), np.int32)
    true[0, :4] = 1
    pred[0, :3] = 1  # IoU 3/4
    scores = object_scores(pred, true, thresholds=[0.7, 0.75, 0.8])
    np.testing.assert_array_equal(scores["tp"], [1, 0, 0])
    np.testing.assert_array_equal(scores["fp"], [0, 1, 1])


def test_empty_images():
    empty = np.zeros((4, 4), np.int32)
    cell = empty.copy()
    cell[1:3, 1:3] = 5
    nothing = object_scores(empty, empty)
    for name in ("precision", "recall", "f1", "ap"):
        assert np.all(nothing[name] == 1.0)
    assert np.all(nothing["tp"] + nothing["fp"] + nothing["fn"] == 0)
    assert nothing["mean_ap"] == 1.0
    for pred, true in ((empty, cell), (cell, empty)):
        scores = object_scores(pred, true)
        for name in ("precision", "recall", "f1", "ap"):
            assert np.all(scores[name] == 0.0)
        assert scores["mean_ap"] == 0.0
    assert np.all(object_scores(empty, cell)["fn"] == 1)
    assert np.all(object_scores(cell, empty)["fp"] == 1)


def test_totals_over_images():
    pred, true = three_true_two_predicted()
    perfect = np.zeros((3, 3), np.int32)
    perfect[1, 1] = 4
    empty = np.zeros((2, 2), np.int32)
    totals = summarize_object_scores([object_scores(pred, true),
                                      object_scores(perfect, perfect),
                                      object_scores(empty, empty)])
    # At 0.5: tp 1 + 1, fp 1 + 0, fn 2 + 0.
    assert (totals["tp"][0], totals["fp"][0], totals["fn"][0]) == (2, 1, 2)
    assert totals["precision"][0] == pytest.approx(2 / 3)
    assert totals["recall"][0] == pytest.approx(2 / 4)
    assert totals["f1"][0] == pytest.approx(4 / 7)
    assert totals["ap"][0] == pytest.approx(2 / 5)
    # At 0.9 and 0.95 only the perfect match is left: tp 1, fp 2, fn 3.
    assert totals["ap"][-1] == pytest.approx(1 / 6)
    assert totals["mean_ap"] == pytest.approx((8 * 2 / 5 + 2 * 1 / 6) / 10)
    assert summarize_object_scores([])["mean_ap"] == 1.0


def test_bad_input_is_refused():
    a = np.zeros((3, 3), np.int32)
    with pytest.raises(ShapeError, match="object_scores: Expect: IoU thresholds in"):
        object_scores(a, a, thresholds=[0.3])
    with pytest.raises(ShapeError, match=r"Actual: \(3, 3\) and \(3, 4\)"):
        match_objects(a, np.zeros((3, 4), np.int32))
    with pytest.raises(ShapeError, match="integer predicted instance ids"):
        match_objects(a.astype(float), a)
    with pytest.raises(ShapeError, match="summarize_object_scores"):
        summarize_object_scores([object_scores(a, a), object_scores(a, a, thresholds=[0.5])])


def brute_force_matches(pred, true, threshold):
    """The largest one-to-one matching among pairs with IoU > threshold (augmenting
    paths), with every IoU computed from the two masks."""
    pred_ids = [k for k in np.unique(pred) if k > 0]
    true_ids = [k for k in np.unique(true) if k > 0]
    iou = np.zeros((len(pred_ids), len(true_ids)))
    for i, p in enumerate(pred_ids):
        for j, t in enumerate(true_ids):
            a, b = pred == p, true == t
            iou[i, j] = (a & b).sum() / (a | b).sum()
    partner = {}

    def augment(i, seen):
        for j in range(len(true_ids)):
            if iou[i, j] > threshold and j not in seen:
                seen.add(j)
                if j not in partner or augment(partner[j], seen):
                    partner[j] = i
                    return True
        return False

    matched = sum(augment(i, set()) for i in range(len(pred_ids)))
    return iou, matched, len(pred_ids), len(true_ids)


@settings(max_examples=60)
@given(h=st.integers(1, 8), w=st.integers(1, 8), seed=st.integers(0, 2**32 - 1),
       ids=st.integers(1, 4))
def test_scores_match_brute_force(h, w, seed, ids):
    rng = np.random.default_rng(seed)
    true = rng.integers(0, ids + 1, (h, w))
    pred = np.where(rng.random((h, w)) < 0.8, true, rng.integers(0, ids + 1, (h, w)))
    pred = pred * 3  # other ids than the truth's
    scores = object_scores(pred, true)
    for t, threshold in enumerate(IOU_THRESHOLDS):
        iou, tp, n_pred, n_true = brute_force_matches(pred, true, threshold)
        assert (scores["tp"][t], scores["fp"][t], scores["fn"][t]) == (
            tp, n_pred - tp, n_true - tp)
        if n_pred + n_true:
            assert scores["ap"][t] == pytest.approx(tp / (n_pred + n_true - tp))
    np.testing.assert_allclose(match_objects(pred, true).dense(), iou)
