"""Metrics of nextchat.evaluation on hand-computed cases (reference §8 definitions)."""

import numpy as np
import pytest
import torch
import torchvision

from nextchat.evaluation import metrics as M
from nextchat.evaluation.data import decode_mask, load_samples
from nextchat.evaluation.paper import detect_split, paper_results


# ---------------------------------------------------------------------------------------------------------- REC


def test_box_iou_hand_cases():
    # identical, half-shifted (inter 2, union 6), disjoint, contained (1/4)
    pred = [[0, 0, 2, 2], [0, 0, 2, 2], [0, 0, 1, 1], [0, 0, 1, 1]]
    gt = [[0, 0, 2, 2], [1, 0, 3, 2], [2, 2, 3, 3], [0, 0, 2, 2]]
    np.testing.assert_allclose(M.box_iou(pred, gt), [1.0, 1 / 3, 0.0, 0.25])


def test_iou_exactly_half_is_a_miss():
    gt = [0.0, 0.0, 2.0, 2.0]
    half = [0.0, 0.0, 2.0, 1.0]  # inter 2, union 4 -> exactly 0.5
    above = [0.0, 0.0, 2.0, 1.01]  # 0.505
    assert M.box_iou(half, gt)[0] == 0.5
    out = M.rec_metrics([half, above, None], [gt, gt, gt])
    assert out["correct"] == 1 and out["n"] == 3 and out["failed"] == 1
    assert out["accuracy"] == pytest.approx(1 / 3)
    assert out["miou"] == pytest.approx((0.5 + 0.505 + 0.0) / 3)


def test_box_iou_matches_torchvision_diagonal_and_inverted_boxes_score_zero():
    rng = np.random.default_rng(0)
    a = rng.random((50, 4))
    b = rng.random((50, 4))
    a = np.concatenate([np.minimum(a[:, :2], a[:, 2:]), np.maximum(a[:, :2], a[:, 2:])], 1)
    b = np.concatenate([np.minimum(b[:, :2], b[:, 2:]), np.maximum(b[:, :2], b[:, 2:])], 1)
    ref = torch.einsum("ii->i", torchvision.ops.box_iou(torch.tensor(a) * 1000, torch.tensor(b) * 1000)).numpy()
    np.testing.assert_allclose(M.box_iou(a, b), ref, rtol=1e-9, atol=1e-12)
    # an inverted raw prediction has no area: IoU 0 (torchvision's intersection is empty too)
    assert M.box_iou([0.6, 0.1, 0.4, 0.9], [0.3, 0.0, 0.7, 1.0])[0] == 0.0
    with pytest.raises(ValueError, match="same number"):
        M.box_iou([[0, 0, 1, 1]], [[0, 0, 1, 1], [0, 0, 1, 1]])


# ---------------------------------------------------------------------------------------------------------- RES


def test_mask_intersection_union_and_empty_masks():
    gt = np.zeros((4, 4), bool)
    gt[:2, :2] = True
    pred = np.zeros((4, 4), bool)
    pred[:2, :] = True
    assert M.mask_intersection_union(pred, gt) == (4, 8)
    assert M.mask_intersection_union(None, gt) == (0, 4)  # no prediction
    assert M.mask_intersection_union(np.zeros((4, 4)), gt) == (0, 4)  # empty prediction
    assert M.mask_intersection_union(np.zeros((4, 4)), np.zeros((4, 4))) == (0, 0)  # both empty
    with pytest.raises(ValueError, match="shapes differ"):
        M.mask_intersection_union(np.zeros((3, 4)), gt)


def test_res_metrics_ciou_differs_from_giou_with_one_huge_mask():
    # sample 0: a huge object, 90% found (I 9000, U 10000); sample 1: a tiny object, missed (I 0, U 20);
    # sample 2: prediction and target both empty (I 0, U 0): IoU 1 for gIoU, nothing for cIoU; a failure (I <= 0)
    out = M.res_metrics([9000, 0, 0], [10000, 20, 0])
    assert out["ciou"] == pytest.approx(9000 / 10020)
    assert out["giou"] == pytest.approx((0.9 + 0.0 + 1.0) / 3)
    assert out["ciou"] != pytest.approx(out["giou"])
    assert out["failed"] == 2 and out["n"] == 3
    assert M.res_metrics([], [])["ciou"] == 0.0
    with pytest.raises(ValueError):
        M.res_metrics([5], [3])


# --------------------------------------------------------------------------------------------------------- POPE


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("The answer is yes .", "yes"),  # the training answer format
        ("The answer is no.", "no"),
        ("So the answer is no.", "no"),
        ("the answer is yes", "yes"),
        ("Yes, there is a dog in the image.", "yes"),  # no pattern: substring test
        ("No, there is no dog.", "no"),
        ("Answer: no", "no"),  # lower-cased first, so `Answer:` never matches: falls back to the substring test
        ("Answer: yes", "yes"),
        ("The answer is yes. The answer is no.", "yes. the answer is no"),  # one greedy match, kept verbatim
        ("The answer is no.\nThe answer is yes.", "yes"),  # two matches (one per line) -> substring test
        ("The answer is no.\nThe answer is no.", "no"),
        ("USER: <image> Is there a cat? ASSISTANT: The answer is No .", "no"),  # cut after "ASSISTANT: "
        ("The answer is no, there is none", "no, there is none"),  # kept verbatim: counts as yes (original)
        ("", "no"),
    ],
)
def test_parse_pope_answer_phrasings(text, parsed):
    assert M.parse_pope_answer(text) == parsed


def test_pope_metrics_hand_computed():
    answers = ["yes", "yes", "no", "no", "yes", "no, there is none"]
    labels = ["yes", "no", "no", "yes", "yes", "no"]
    out = M.pope_metrics(answers, labels)
    # the last answer is not exactly "no": a yes, as in the original -> TP 2, FP 2, TN 1, FN 1
    assert (out["tp"], out["fp"], out["tn"], out["fn"]) == (2, 2, 1, 1)
    assert out["accuracy"] == pytest.approx(3 / 6)
    assert out["precision"] == pytest.approx(2 / 4)
    assert out["recall"] == pytest.approx(2 / 3)
    assert out["f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert out["yes_ratio"] == pytest.approx(4 / 6)
    all_no = M.pope_metrics(["no", "no"], ["yes", "no"])
    assert all_no["precision"] == 0.0 and all_no["f1"] == 0.0 and all_no["accuracy"] == 0.5


# -------------------------------------------------------------------------------------------------- captioning


def test_extract_caption():
    assert M.extract_caption("USER: x ASSISTANT: A Red Circle.</s>junk") == "a red circle."
    assert M.extract_caption("The Man") == "the man"


def test_cider_hand_computed_and_equal_to_pycocoevalcap():
    from pycocoevalcap.cider.cider import Cider

    refs = ["a red circle on the left", "the blue square near the top", "two green diamonds at bottom"]
    # each prediction equals its (only) reference, every reference has 4-grams, and no n-gram occurs in all
    # three references (idf > 0): each cosine is 1, CIDEr-D = 10 per sample -> 1000 on the x100 scale
    exact = M.caption_metrics(refs, refs, tokenizer="simple", meteor=False)
    assert exact["cider"] == pytest.approx(1000.0)
    # a 3-word caption has no 4-gram: its n=4 term is 0 -> (1 + 1 + 1 + 0) / 4 * 10 = 7.5 for that sample
    short = ["a red circle on the left", "the blue square near the top", "two green diamonds"]
    assert M.caption_metrics(short, short, tokenizer="simple", meteor=False)["cider"] == pytest.approx(
        (10 + 10 + 7.5) / 3 * 100
    )
    assert exact["tokenizer"] == "simple" and exact["meteor"] is None
    preds = ["a red circle", "purple", "two green diamonds on the left"]
    out = M.caption_metrics(preds, refs, tokenizer="simple", meteor=False)
    direct, _ = Cider().compute_score({i: [r] for i, r in enumerate(refs)}, {i: [p] for i, p in enumerate(preds)})
    assert out["cider"] == pytest.approx(direct * 100)
    assert 0 < out["cider"] < 1000
    with pytest.raises(ValueError):
        M.caption_metrics(["a"], ["a", "b"])


def test_caption_tokenizers_and_meteor():
    sentences = ["A man's hat, (red) isn't here...", 'the guy on the left with a "blue" shirt!',
                 "Two dogs; one: brown/white.", "kids' toys aren't 3.5 inches", "left-most zebra"]
    simple, used = M.tokenize_captions({i: [s] for i, s in enumerate(sentences)}, "simple")
    assert used == "simple"
    assert simple[0] == ["a man 's hat -lrb- red -rrb- is n't here"]
    assert simple[2] == ["two dogs one brown/white"]
    if M.java_available():  # the real PTBTokenizer: the approximation agrees on these sentences; METEOR runs
        ptb, used = M.tokenize_captions({i: [s] for i, s in enumerate(sentences)}, "ptb")
        assert used == "ptb" and ptb == simple
        out = M.caption_metrics(["a red circle", "a cat"], ["a red circle", "the blue square"], meteor=True)
        assert out["tokenizer"] == "ptb" and 0 < out["meteor"] < 100
    else:
        with pytest.raises(RuntimeError, match="java"):
            M.tokenize_captions({0: ["x"]}, "ptb")
        assert M.caption_metrics(["a"], ["a"])["tokenizer"] == "simple"


# ------------------------------------------------------------------------------------------- data and splits


def test_detect_split_and_paper_numbers():
    assert detect_split("rec", "data/REC_refcoco_unc_val.jsonl") == "refcoco_val"
    assert detect_split("rec", "REC_refcoco+_unc_testA.jsonl") == "refcoco+_testA"
    assert detect_split("res", "RES_refcocog_umd_test.jsonl") == "refcocog_test"
    assert detect_split("reg", "REC_refcocog_google_val.jsonl") == "refcocog_google_val"
    assert detect_split("pope", "coco_pope_adversarial.json") == "adversarial"
    assert detect_split("rec", "my_data.jsonl") is None
    assert paper_results("rec", "refcoco_val") == {"accuracy": 85.5}
    assert paper_results("res", "refcoco+_testB") == {"ciou": 56.7}
    assert paper_results("pope", "random") == {"accuracy": 87.70, "f1": 87.28}
    assert paper_results("reg", "refcocog_google_val") == {"cider": 79.6, "meteor": 12.0}
    assert paper_results("rec", None) is None


def test_decode_mask_polygon_rle_and_png(tmp_path):
    from nextchat.processing import rle_encode

    # a 4 x 3 rectangle as a COCO polygon (pixel edges 2..6 x 1..4)
    poly = decode_mask([[2, 1, 6, 1, 6, 4, 2, 4]], 8, 10)
    assert poly.shape == (8, 10) and poly.dtype == bool
    assert poly[1:4, 2:6].all()
    assert abs(int(poly.sum()) - 12) <= 8  # pycocotools rasterises edges its own way
    mask = np.zeros((8, 10), bool)
    mask[2:5, 3:7] = True
    np.testing.assert_array_equal(decode_mask(rle_encode(mask), 8, 10), mask)
    import PIL.Image

    PIL.Image.fromarray(mask.astype(np.uint8) * 255).save(tmp_path / "m.png")
    np.testing.assert_array_equal(decode_mask("m.png", 8, 10, None, str(tmp_path)), mask)
    with pytest.raises(ValueError, match="shape"):
        decode_mask(rle_encode(mask), 9, 10)


def test_load_samples_formats(tmp_path):
    path = tmp_path / "REC_refcoco_unc_val.jsonl"
    path.write_text(
        '{"img_path": "a.jpg", "expression": "the dog", "bbox": [1, 2, 3, 4]}\n'
        '\n'
        '{"id": 7, "image": "b.jpg", "expressions": ["left man", "man on the left"], "bbox": [0, 0, 2, 2],'
        ' "bbox_format": "xywh", "mask": [[0, 0, 2, 0, 2, 2]]}\n'
    )
    rec = load_samples("rec", str(path))
    assert [s.id for s in rec] == ["0", "7#0", "7#1"]
    assert rec[0].bbox == [1, 2, 3, 4] and rec[1].bbox == [0, 0, 2, 2] and rec[2].expression == "man on the left"
    assert [s.id for s in load_samples("rec", str(path), expressions="first")] == ["0", "7"]
    res_only = tmp_path / "RES_refcoco_unc_val.jsonl"  # RES needs no box
    res_only.write_text('{"img_path": "a.jpg", "sents": ["x"], "segmentation": [[0, 0, 2, 0, 2, 2]]}\n')
    (res,) = load_samples("res", str(res_only))
    assert res.bbox is None and res.mask == [[0, 0, 2, 0, 2, 2]] and res.expression == "x"
    reg = load_samples("reg", str(path))
    assert reg[1].references == ["left man", "man on the left"]
    pope = tmp_path / "coco_pope_random.json"
    pope.write_text('[{"question_id": 1, "image": "x.jpg", "text": "Is there a cat?", "label": "Yes"}]')
    (sample,) = load_samples("pope", str(pope))
    assert (sample.id, sample.expression, sample.label) == ("1", "Is there a cat?", "yes")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"img_path": "a.jpg", "expression": "x", "bbox": [1, 2, 3, 4]}\n'
                   '{"img_path": "a.jpg", "expression": "y", "bbox": [1, 2, 3, 4], "id": "0"}\n')
    with pytest.raises(ValueError, match="twice"):
        load_samples("rec", str(bad))
    with pytest.raises(ValueError, match="task"):
        load_samples("vqa", str(path))
