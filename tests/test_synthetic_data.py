"""The opt-in variations of the synthetic shapes data (issue 24: phrasing families, held-out families, absent objects,
relations, mixed multi-turn conversations) and of its evaluation (every object, phrasings, absent questions,
second-turn accuracy, 95% intervals). Checked against hand-written examples and recomputed from the scenes."""

import hashlib
import json
import math
import os
import re

import numpy as np
import pytest
import torch

from nextchat.training.synthetic import (
    COLORS,
    HELD_OUT_PHRASINGS,
    PHRASING_FAMILIES,
    SHAPES,
    TRAIN_PHRASINGS,
    absent_attributes,
    distractor_fraction,
    family_question,
    main as synthetic_main,
    make_sample,
    relational_phrases,
    render_scene,
    scramble_words,
    task_corpus,
    write_dataset,
)
from nextchat.training.synthetic_eval import (
    build_queries,
    build_query_set,
    bootstrap_ratio_interval,
    evaluate,
    normal_interval,
    score,
    wilson_interval,
)
from test_training import IMAGE, SCENE, TINY_SPEC  # the training tests' tiny model and scenes

SHIPPED = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "tiny-nextchat-shapes")


COLOR_WORDS = "red|green|blue|yellow|purple"
SHAPE_WORDS = "square|circle|triangle|diamond"
# hand-written: the synonyms the synonym family may use
SYNONYM_COLOR = {"crimson": "red", "scarlet": "red", "emerald": "green", "cobalt": "blue", "golden": "yellow",
                 "violet": "purple"}
SYNONYM_SHAPE = {"disc": "circle", "rhombus": "diamond"}


def _questions(record):
    """(query, user question without `<image>`) per turn."""
    users = [m["content"].replace("<image> ", "") for m in record["conversations"] if m["role"] == "user"]
    return list(zip(record["queries"], users))


def _answers(record):
    return [m["content"] for m in record["conversations"] if m["role"] == "assistant"]


# ------------------------------------------------------------------------------------------------------------------
# the default output is unchanged
# ------------------------------------------------------------------------------------------------------------------


def _hash_samples(seeds, **kwargs):
    h = hashlib.sha256()
    for seed in seeds:
        image, record = make_sample(seed, **kwargs)
        h.update(np.asarray(image).tobytes())
        h.update(json.dumps(record, sort_keys=True).encode())
    return h.hexdigest()


def test_default_generator_and_eval_queries_are_byte_identical_to_before_the_options():
    # hashes computed on the code BEFORE the opt-in options were added
    assert _hash_samples([0, 1, 7, 42, 123456]) == "0d371d09a5596379436181c0d83f34b24b34577db4b37290573aef9254a76e4e"
    assert _hash_samples([3, 5, 9], max_turns=1, task_weights={"reg": 0.3}, caption_order="name") == \
        "ca4590cf5c001f90da2c65b668b0f784ab6fae058b832fa111866895ce7bfaa3"
    assert _hash_samples([0, 2], shapes=SHAPES + ("star",), focus_shape="star") == \
        "c01f2ba47ab84b18479aa3f8b6ea1b68421e933710a437eb284f7aa551728f0d"
    h = hashlib.sha256()
    for q in build_queries(range(1_000_000, 1_000_006)):
        h.update(np.asarray(q["image"]).tobytes())
        fields = {k: q[k] for k in ("seed", "task", "object", "boxes", "question")}
        h.update(json.dumps(fields, sort_keys=True).encode())
    assert h.hexdigest() == "e4c26b6c2c8bd8f33cbc7342dc294bc5e0e79b53afeafe4a027d51821d9102f9"
    # the shipped tokenizer's corpus
    assert hashlib.sha256(json.dumps(task_corpus()).encode()).hexdigest() == \
        "da8b17f695ab45edbfb5e1c55de9627f971115b22a7ea498ec407e3864f3c1d2"


def test_template_family_alone_gives_the_default_conversations():
    for seed in range(25):
        _, default = make_sample(seed)
        _, templated = make_sample(seed, phrasings=["template"])
        for key in ("boxes", "masks", "conversations", "task", "objects"):
            assert templated[key] == default[key], (seed, key)
        assert [{k: v for k, v in q.items() if k != "phrasing"} for q in templated["queries"]] == default["queries"]


# ------------------------------------------------------------------------------------------------------------------
# phrasing families
# ------------------------------------------------------------------------------------------------------------------


def test_each_family_by_hand_for_a_fixed_stream():
    expected = {  # rng = default_rng(0): rec red circle, res blue diamond, reg [1], gc
        "template": ("Show me the red circle.", "Please give the mask of the blue diamond.", "Describe the region [1].",
                     "Describe the image with object locations."),
        "question": ("Is there a red circle? Where?", "Which pixels belong to the blue diamond?",
                     "Do you know what [1] shows?", "Which objects do you see, and where are they?"),
        "command": ("Show where the red circle is.", "Please segment the blue diamond.", "Identify [1].",
                    "Name every object and mark where it is."),
        "no_article": ("show red circle", "mask of blue diamond", "object at [1]",
                       "describe image with object locations"),
        "lower": ("show me the red circle.", "please give the mask of the blue diamond.", "describe the region [1].",
                  "describe the image with object locations."),
        "upper": ("SHOW ME THE RED CIRCLE.", "PLEASE GIVE THE MASK OF THE BLUE DIAMOND.", "DESCRIBE THE REGION [1].",
                  "DESCRIBE THE IMAGE WITH OBJECT LOCATIONS."),
        "bare": ("red circle?", "the blue diamond, segmented", "[1]", "objects?"),
        "synonym": ("Show me the scarlet disc.", "Please give the mask of the cobalt rhombus.",
                    "What object is at [1]?", "Describe the image with object locations."),
        "fronted": ("Here, where is the red circle?", "On this image, outline the blue diamond.",
                    "Here, what is in [1]?", "Given the picture, describe it with object locations."),
        "appositive": ("Show me the circle, the red one.", "Give the mask of the diamond, the blue one.",
                       "The region [1]: what does it show?",
                       "The objects in the image: name them with their locations."),
        "postposed": ("Show me the circle which is red.", "Give the mask of the diamond which is blue.",
                      "At [1], which object is it?", "With object locations, describe the image."),
        "indirect": ("Tell me where the red circle is, please.", "I would like the blue diamond segmented.",
                     "I would like to know what [1] is.",
                     "I would like a description of the image with object locations."),
    }
    assert set(expected) == set(PHRASING_FAMILIES)
    for family, (rec, res, reg, gc) in expected.items():
        rng = np.random.default_rng(0)
        got = (family_question(family, "rec", rng, "red", "circle"),
               family_question(family, "res", rng, "blue", "diamond"),
               family_question(family, "reg", rng, i=1), family_question(family, "gc", rng))
        assert got == (rec, res, reg, gc), family
    # hand-written samples: seed 3 and 11, one postposed rec turn each
    _, record = make_sample(3, phrasings=["postposed"], allow_held_out=True, max_turns=1, tasks=("rec",))
    assert record["conversations"][0]["content"] == "<image> Where is the square that is green?"
    assert record["conversations"][1]["content"] == "The green square [0]."
    _, record = make_sample(11, phrasings=["postposed"], allow_held_out=True, max_turns=1, tasks=("rec",))
    assert record["conversations"][0]["content"] == "<image> Where is the diamond that is red?"


# the stated shape of each family's rec/res sentences, for a target (colour, shape); independent of the templates
def _family_shape_ok(family, text, color, shape):
    canonical = f"{color} {shape}"
    if family == "template":
        return text[0].isupper() and text.endswith((".", "?")) and f"the {canonical}" in text
    if family == "question":
        first = text.split()[0]
        return (text.endswith("?") and (f"the {canonical}" in text or f"a {canonical}?" in text)
                and first in ("Could", "Do", "Which", "Where", "Can", "Is"))
    if family == "command":
        return text.endswith(".") and f"the {canonical}" in text and text.split()[0] in (
            "Point", "Mark", "Give", "Put", "Please", "Show", "Outline", "Mask", "Cut", "Draw")
    if family == "no_article":
        return text == text.lower() and text[-1].isalpha() and canonical in text and "the" not in text.split()
    if family == "lower":
        return text == text.lower() and canonical in text and text.endswith((".", "?"))
    if family == "upper":
        return text == text.upper() and canonical.upper() in text
    if family == "bare":
        return re.fullmatch(rf"(the )?{canonical}(\?| mask|, segmented)?", text) is not None
    if family == "synonym":
        words = re.findall(r"[a-z]+", text.lower())
        colors = [SYNONYM_COLOR[w] for w in words if w in SYNONYM_COLOR]
        shapes = [SYNONYM_SHAPE.get(w, w) for w in words if w in SYNONYM_SHAPE or w in SHAPES]
        return colors == [color] and shapes == [shape] and color not in words
    if family == "fronted":
        lead, _, request = text.partition(", ")
        return (lead in ("In this image", "Given the picture", "For this image", "On this image", "Now", "Here")
                and f"the {canonical}" in request and request[0].islower() and text.endswith((".", "?")))
    if family == "appositive":
        return re.search(rf"\bthe {shape}(,|\?) (t|T)he {color} one\.$", text) is not None
    if family == "postposed":
        return re.search(rf"\bthe {shape} (that|which) is {color}\b", text) is not None
    if family == "indirect":
        return text.startswith(("I ", "Tell me where")) and f"the {canonical}" in text and text.endswith(".")
    raise AssertionError(family)


@pytest.mark.parametrize("family", list(PHRASING_FAMILIES))
def test_each_family_produces_its_stated_sentence_shape(family):
    seen = 0
    for seed in range(40):
        _, record = make_sample(seed, phrasings=[family], allow_held_out=True, tasks=("rec", "res"), max_turns=2)
        for query, question in _questions(record):
            assert query["phrasing"] == family
            o = record["objects"][query["object"]]
            assert _family_shape_ok(family, question, o["color"], o["shape"]), (family, question)
            seen += 1
        # answers keep the canonical words
        for query, answer in zip(record["queries"], _answers(record)):
            o = record["objects"][query["object"]]
            assert answer.startswith(f"The {o['color']} {o['shape']} [")
    assert seen >= 40


def test_fronted_leads_do_not_tell_the_task():
    # every leading phrase that one task's questions use, every other task's questions use too
    leads = {}
    for task in ("rec", "res", "reg", "gc"):
        rng = np.random.default_rng(5)
        sentences = {family_question("fronted", task, rng, "red", "circle", i=0) for _ in range(400)}
        leads[task] = {re.sub(r"\[0\]", "[i]", text.partition(", ")[0]) for text in sentences if ", " in text}
    assert leads["rec"] == leads["res"] == leads["gc"] == leads["reg"] - {"Given [i]", "About [i]"}
    assert len(leads["rec"]) >= 6
    # the request after the lead names the task's object, or the box
    rng = np.random.default_rng(6)
    assert all("[3]" in family_question("fronted", "reg", rng, i=3) for _ in range(100))


def test_held_out_families_are_refused_for_training_and_never_in_training_output(tmp_path):
    assert set(HELD_OUT_PHRASINGS) == {"postposed", "indirect"}
    assert not set(HELD_OUT_PHRASINGS) & set(TRAIN_PHRASINGS)
    for family in HELD_OUT_PHRASINGS:
        with pytest.raises(ValueError, match="held out"):
            make_sample(0, phrasings=[family])
        with pytest.raises(SystemExit):
            synthetic_main([str(tmp_path / "bad"), "--num", "2", "--phrasings", f"template,{family}"])
    with pytest.raises(ValueError, match="held out"):
        make_sample(0, phrasings="all")
    # every sentence a held-out family can ask, for every object
    held_out = set()
    for family in HELD_OUT_PHRASINGS:
        for task, templates in PHRASING_FAMILIES[family].items():
            for t in templates:
                held_out |= {t.format(p=f"{c} {s}", c=c, s=s, i=i) for c in COLORS for s in SHAPES for i in range(4)}
    users = []
    for seed in range(300):
        _, record = make_sample(seed, phrasings="train", absent_fraction=0.2, relation_fraction=0.3, max_turns=3,
                                mix_turn_tasks=True)
        users += [q for _, q in _questions(record)]
    assert len(users) > 500
    assert not set(users) & held_out
    # their markers: a colour after its shape, statements starting with "I"
    for text in users:
        assert not re.search(rf"\b({SHAPE_WORDS}) (that|which) is ({COLOR_WORDS})\b", text, re.I), text
        assert not text.startswith("I "), text
    # every training family occurs
    families = set()
    for seed in range(100):
        families |= {q["phrasing"] for q in make_sample(seed, phrasings="train")[1]["queries"]}
    assert families == set(TRAIN_PHRASINGS)
    # the tokenizer corpus of the phrasings never holds a held-out sentence
    corpus = set(task_corpus(phrasings=True))
    assert not corpus & held_out
    assert task_corpus(phrasings=True)[: len(task_corpus())] == task_corpus()


def test_phrasings_tokenizer_keeps_every_training_word_whole():
    from nextchat.training.synthetic import build_shapes_tokenizer

    tokenizer = build_shapes_tokenizer(phrasings=True)
    assert len(tokenizer) == 1024 + 5  # PHRASINGS_VOCAB_SIZE + the five NExT-Chat tokens
    words = set()
    for seed in range(300):
        _, record = make_sample(seed, phrasings="train", absent_fraction=0.2, relation_fraction=0.5, max_turns=3)
        for message in record["conversations"]:
            words |= set(re.findall(r"[A-Za-z]+", message["content"].replace("<image>", "")))
    assert {"crimson", "disc", "WHERE", "no", "left", "shapes"} <= words
    assert [w for w in sorted(words) if len(tokenizer.tokenize(" " + w)) != 1] == []
    # a held-out carrier word was never in the corpus: it is not one piece
    assert len(tokenizer.tokenize(" looking")) > 1


def test_generator_cli_writes_the_options(tmp_path):
    synthetic_main([str(tmp_path / "a"), "--num", "12", "--phrasings", "question,command", "--absent-fraction", "0.5",
                    "--relation-fraction", "0.5", "--max-turns", "3", "--min-turns", "3", "--mix-turn-tasks"])
    records = [json.loads(line) for line in open(tmp_path / "a" / "data.jsonl")]
    assert {q["phrasing"] for r in records for q in r["queries"]} == {"question", "command"}
    assert any("absent" in q for r in records for q in r["queries"])
    synthetic_main([str(tmp_path / "b"), "--num", "4", "--phrasings", "held_out", "--allow-held-out"])
    records = [json.loads(line) for line in open(tmp_path / "b" / "data.jsonl")]
    assert {q["phrasing"] for r in records for q in r["queries"]} <= set(HELD_OUT_PHRASINGS)
    with pytest.raises(SystemExit):
        synthetic_main([str(tmp_path / "c"), "--phrasings", "shouting"])
    with pytest.raises(SystemExit):
        synthetic_main([str(tmp_path / "c"), "--absent-fraction", "1.5"])
    # the default command writes what make_sample writes by default
    synthetic_main([str(tmp_path / "d"), "--num", "3"])
    records = [json.loads(line) for line in open(tmp_path / "d" / "data.jsonl")]
    assert [r["conversations"] for r in records] == [make_sample(s)[1]["conversations"] for s in range(3)]


# ------------------------------------------------------------------------------------------------------------------
# absent objects, relations, mixed turns
# ------------------------------------------------------------------------------------------------------------------


def _named_attributes(text):
    """(colour, shape) named in a question, synonyms mapped back (parsed independently of the generator)."""
    words = re.findall(r"[a-z]+", text.lower())
    colors = [SYNONYM_COLOR.get(w, w) for w in words if w in COLORS or w in SYNONYM_COLOR]
    shapes = [SYNONYM_SHAPE.get(w, w) for w in words if w in SHAPES or w in SYNONYM_SHAPE]
    return colors, shapes


def test_absent_questions_never_name_an_object_of_the_scene_and_are_answered_without_a_box():
    count = 0
    for seed in range(150):
        _, record = make_sample(seed, phrasings="train", absent_fraction=1.0, tasks=("rec", "res"), max_turns=2)
        present = {(o["color"], o["shape"]) for o in record["objects"]}
        for (query, question), answer in zip(_questions(record), _answers(record)):
            assert query["object"] is None and "absent" in query
            colors, shapes = _named_attributes(question)
            assert len(colors) == 1 and len(shapes) == 1, question
            assert (colors[0], shapes[0]) not in present
            assert [colors[0], shapes[0]] == query["absent"]
            assert answer == f"There is no {colors[0]} {shapes[0]}."
            assert "[" not in answer
            # a hard negative: it shares the colour or the shape of an object of the scene
            assert any(o["color"] == colors[0] or o["shape"] == shapes[0] for o in record["objects"])
            count += 1
        assert record["boxes"] == [] and record["masks"] == []  # no turn refers to a box
    assert count >= 150
    assert distractor_fraction([record]) == 0.0  # absent questions are not referring queries
    # a fraction: roughly that share of the rec/res turns
    queries = [q for s in range(300)
               for q in make_sample(s, absent_fraction=0.3, tasks=("rec",), max_turns=1)[1]["queries"]]
    assert 0.22 < np.mean(["absent" in q for q in queries]) < 0.38
    # a scene holding every pair but one: that pair is the only candidate
    objects = [{"color": c, "shape": s} for c in COLORS for s in SHAPES if (c, s) != ("purple", "circle")]
    assert absent_attributes(objects, np.random.default_rng(0)) == ("purple", "circle")


def test_conjunction_absent_questions_pair_a_present_colour_with_a_present_shape():
    # by hand: a red circle and a blue square; the pairs with both attributes present are red square and blue circle
    objects = [{"color": "red", "shape": "circle"}, {"color": "blue", "shape": "square"}]
    drawn = {absent_attributes(objects, np.random.default_rng(s), conjunction=True) for s in range(200)}
    assert drawn == {("red", "square"), ("blue", "circle")}
    assert len({absent_attributes(objects, np.random.default_rng(s)) for s in range(200)}) > 2  # without it: more
    # a lone object has no such pair: the hard pool as before (same draw as without `conjunction`)
    lone = [{"color": "red", "shape": "circle"}]
    for s in range(20):
        assert absent_attributes(lone, np.random.default_rng(s), conjunction=True) == \
            absent_attributes(lone, np.random.default_rng(s))
    # in the samples: with fraction 1 every absent question whose scene has such a pair asks one, recomputed here
    asked = with_pair = 0
    for seed in range(200):
        _, record = make_sample(seed, absent_fraction=1.0, absent_conjunction_fraction=1.0, tasks=("rec",),
                                max_turns=1, phrasings="train")
        objects = record["objects"]
        for query in record["queries"]:
            color, shape = query["absent"]
            assert all((o["color"], o["shape"]) != (color, shape) for o in objects)
            has_pair = any((a["color"], b["shape"]) not in {(o["color"], o["shape"]) for o in objects}
                           for a in objects for b in objects)
            if has_pair:
                with_pair += 1
                assert any(o["color"] == color for o in objects) and any(o["shape"] == shape for o in objects)
            asked += 1
    assert asked == 200 and with_pair > 100
    # a fraction: in the scenes that have such a pair, that share of the questions plus the uniform draw's own
    def conjunction_share(fraction):
        kinds = []
        for seed in range(400):
            _, record = make_sample(seed, absent_fraction=1.0, absent_conjunction_fraction=fraction, tasks=("rec",),
                                    max_turns=1)
            objects, (color, shape) = record["objects"], record["queries"][0]["absent"]
            present = {(o["color"], o["shape"]) for o in objects}
            if any((a["color"], b["shape"]) not in present for a in objects for b in objects):
                kinds.append(any(o["color"] == color for o in objects) and any(o["shape"] == shape for o in objects))
        return np.mean(kinds)

    base = conjunction_share(0.0)
    assert base < 0.3
    assert abs(conjunction_share(0.5) - (0.5 + 0.5 * base)) < 0.1
    # 0 (the default) leaves the samples as they were
    assert make_sample(7, absent_fraction=0.5, absent_conjunction_fraction=0.0)[1] == \
        make_sample(7, absent_fraction=0.5)[1]
    with pytest.raises(ValueError, match="absent_conjunction_fraction"):
        make_sample(0, absent_fraction=0.3, absent_conjunction_fraction=1.5)
    with pytest.raises(ValueError, match="needs `absent_fraction` > 0"):
        make_sample(0, absent_conjunction_fraction=0.5)


def test_conjunction_option_on_the_command_line(tmp_path, capsys):
    synthetic_main([str(tmp_path / "a"), "--num", "6", "--tasks", "rec", "--max-turns", "1", "--absent-fraction", "1",
                    "--absent-conjunction-fraction", "1"])
    records = [json.loads(line) for line in open(tmp_path / "a" / "data.jsonl")]
    for record in records:
        assert record == {**make_sample(record["seed"], tasks=("rec",), max_turns=1, absent_fraction=1.0,
                                        absent_conjunction_fraction=1.0)[1], "image": record["image"]}
    with pytest.raises(SystemExit):
        synthetic_main([str(tmp_path / "b"), "--absent-conjunction-fraction", "0.5"])
    assert "needs --absent-fraction > 0" in capsys.readouterr().err


def test_an_absent_only_record_encodes_for_training(tmp_path):
    from nextchat.training.data import encode_record
    from nextchat.training.synthetic import build_shapes_processor

    image, record = make_sample(4, absent_fraction=1.0, tasks=("rec",), max_turns=1, height=32, width=32,
                                min_size=6, max_size=12)
    image.save(tmp_path / "image.png")
    processor = build_shapes_processor(image_size=32, patch_size=8, sam_image_size=None)
    out = encode_record({**record, "image": str(tmp_path / "image.png")}, processor, use_masks=False)
    labels = out["labels"][out["labels"] != -100]
    text = processor.tokenizer.decode(labels)
    assert "There is no" in text and processor.trigger_token_id not in out["input_ids"].tolist()


def test_relational_phrases_are_unambiguous():
    pattern = re.compile(rf"\b(left|right) one of the two (?:({COLOR_WORDS}) shapes|({SHAPE_WORDS})s)\b", re.I)
    count = 0
    for seed in range(250):
        _, record = make_sample(seed, phrasings="train", relation_fraction=1.0, tasks=("rec", "res"), max_turns=2)
        objects = record["objects"]
        for (query, question), answer in zip(_questions(record), _answers(record)):
            if "relation" not in query:
                assert not pattern.search(question)
                continue
            match = pattern.search(question)
            assert match, question
            side, color, shape = match.group(1).lower(), match.group(2), match.group(3)
            group = [j for j, o in enumerate(objects)
                     if (color and o["color"] == color.lower()) or (shape and o["shape"] == shape.lower())]
            assert len(group) == 2 and query["object"] in group
            target = objects[query["object"]]["box"]
            other = objects[group[0] if group[1] == query["object"] else group[1]]["box"]
            ct, co = (target[0] + target[2]) / 2, (other[0] + other[2]) / 2
            assert (ct < co) == (side == "left")
            assert not other[0] <= ct <= other[2] and not target[0] <= co <= target[2]
            t = objects[query["object"]]
            assert answer.startswith(f"The {t['color']} {t['shape']} [")
            count += 1
    assert count > 50
    # by hand: two red shapes far apart, a blue circle; the middle one cannot be told "left" of anything by colour
    objects = [{"color": "red", "shape": "square", "box": [0, 0, 10, 10]},
               {"color": "red", "shape": "circle", "box": [40, 0, 50, 10]},
               {"color": "blue", "shape": "circle", "box": [8, 30, 30, 50]}]
    assert relational_phrases(objects, 0) == ["left one of the two red shapes"]
    assert relational_phrases(objects, 1) == ["right one of the two red shapes", "right one of the two circles"]
    assert relational_phrases(objects, 2) == ["left one of the two circles"]
    objects[2]["box"] = [38, 30, 52, 50]  # now under the red circle: x-centres too close for left/right
    assert relational_phrases(objects, 1) == ["right one of the two red shapes"]
    assert relational_phrases(objects, 2) == []
    objects.append({"color": "red", "shape": "diamond", "box": [20, 50, 30, 60]})  # three red shapes: no "two"
    assert relational_phrases(objects, 0) == []


def test_mix_turn_tasks_never_repeats_a_task_in_consecutive_turns():
    repeats_default = 0
    for seed in range(150):
        _, mixed = make_sample(seed, max_turns=4, min_turns=4, mix_turn_tasks=True)
        assert all(a != b for a, b in zip(mixed["task"], mixed["task"][1:])), mixed["task"]
        assert mixed["task"].count("gc") <= 1
        _, default = make_sample(seed, max_turns=4, min_turns=4)
        repeats_default += any(a == b for a, b in zip(default["task"], default["task"][1:]))
    assert repeats_default > 30  # without the option, repeats are common


def test_scramble_words_permutes_the_words_and_keeps_the_closing_mark():
    rng = np.random.default_rng(0)
    orders = set()
    for _ in range(50):
        out = scramble_words("Where is the red circle?", rng)
        assert out.endswith("?") and not out[:-1].endswith("?")
        assert sorted(out[:-1].split()) == sorted(["Where", "is", "the", "red", "circle"])
        orders.add(out)
    assert len(orders) > 20  # 5! = 120 orders: the draw really varies
    assert sorted(scramble_words("Given [0], name the object.", rng)[:-1].split()) == \
        sorted(["Given", "[0],", "name", "the", "object"])
    assert scramble_words("segment red diamond", np.random.default_rng(1)).count(" ") == 2  # no mark: none added
    assert scramble_words("[1]?", rng) == "[1]?"


def test_scramble_fraction_reorders_only_the_questions_and_leaves_the_rest_of_the_sample():
    options = dict(max_turns=2, phrasings="train", absent_fraction=0.3, relation_fraction=0.3, mix_turn_tasks=True)
    scrambled = relations = 0
    for seed in range(150):
        _, plain = make_sample(seed, **options)
        _, noisy = make_sample(seed, scramble_fraction=1.0, **options)
        assert noisy["boxes"] == plain["boxes"] and noisy["task"] == plain["task"]
        assert noisy["conversations"][1::2] == plain["conversations"][1::2]  # answers never change
        for p, n, q in zip(plain["conversations"][::2], noisy["conversations"][::2], noisy["queries"]):
            if "relation" in q:  # a relation's words keep their order
                relations += 1
                assert n == p and "scrambled" not in q
            elif q.pop("scrambled", False):
                scrambled += 1
                assert n["content"][-1] == p["content"][-1] or p["content"][-1] not in "?."
                words = [sorted((t[:-1] if t[-1] in "?." else t).split()) for t in (n["content"], p["content"])]
                assert words[0] == words[1]
                assert n["content"].startswith("<image> ") == p["content"].startswith("<image> ")
        assert noisy["queries"] == plain["queries"]  # the "scrambled" marks popped: the same queries
    assert scrambled > 150 and relations > 10
    # a fraction: about that share of the questions; 0 (the default) leaves the samples as they were
    shares = [q.get("scrambled", False) for seed in range(400)
              for q in make_sample(seed, scramble_fraction=0.2, **options)[1]["queries"] if "relation" not in q]
    assert abs(np.mean(shares) - 0.2) < 0.05
    assert make_sample(7, scramble_fraction=0.0, **options)[1] == make_sample(7, **options)[1]
    with pytest.raises(ValueError, match="scramble_fraction"):
        make_sample(0, scramble_fraction=1.5)


def test_scramble_option_on_the_command_line(tmp_path, capsys):
    synthetic_main([str(tmp_path / "a"), "--num", "6", "--max-turns", "2", "--phrasings", "train",
                    "--scramble-fraction", "0.5"])
    records = [json.loads(line) for line in open(tmp_path / "a" / "data.jsonl")]
    for record in records:
        assert record == {**make_sample(record["seed"], max_turns=2, phrasings="train", scramble_fraction=0.5)[1],
                          "image": record["image"]}
    with pytest.raises(SystemExit):
        synthetic_main([str(tmp_path / "b"), "--scramble-fraction", "2"])
    assert "--scramble-fraction must be in [0, 1]" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------------------------
# evaluation: intervals, query sets, scoring
# ------------------------------------------------------------------------------------------------------------------


def test_intervals_equal_hand_computed_values():
    lo, hi = wilson_interval(8, 10)  # the textbook Wilson interval of 8/10: 0.490 to 0.943
    assert abs(lo - 0.4902) < 1e-4 and abs(hi - 0.9433) < 1e-4
    lo, hi = wilson_interval(0, 10)  # upper = z^2 / (n + z^2)
    assert lo == pytest.approx(0.0) and abs(hi - 1.959964 ** 2 / (10 + 1.959964 ** 2)) < 1e-6
    lo, hi = wilson_interval(10, 10)
    assert abs(lo - 10 / (10 + 1.959964 ** 2)) < 1e-6 and hi == pytest.approx(1.0)
    assert all(math.isnan(v) for v in wilson_interval(0, 0))
    lo, hi = normal_interval([0.2, 0.4, 0.6])  # mean 0.4, sd 0.2, n 3
    half = 1.959964 * 0.2 / math.sqrt(3)
    assert abs(lo - (0.4 - half)) < 1e-6 and abs(hi - (0.4 + half)) < 1e-6
    assert normal_interval([0.9, 1.0, 1.0, 1.0])[1] == 1.0  # clipped
    lo, hi = bootstrap_ratio_interval([5, 5, 5, 5], [10, 10, 10, 10])
    assert lo == hi == 0.5
    lo, hi = bootstrap_ratio_interval([0, 10] * 20, [10, 10] * 20)
    assert 0.3 < lo < 0.5 < hi < 0.7


SEEDS = range(1_000_000, 1_000_012)


def test_every_object_asks_each_object_exactly_once_per_task():
    queries = build_query_set(SEEDS, every_object=True)
    for seed in SEEDS:
        _, objects = render_scene(seed)
        for task in ("rec", "res", "reg"):
            asked = sorted(q["object"] for q in queries if q["seed"] == seed and q["task"] == task)
            assert asked == list(range(len(objects))), (seed, task)
        assert sum(q["seed"] == seed and q["task"] == "gc" for q in queries) == 1
    for q in queries:
        if q["task"] in ("rec", "res"):
            assert q["objects"][q["object"]]["color"] in q["question"]
        if q["task"] == "reg":
            assert q["boxes"] == [q["objects"][q["object"]]["box"]]
    # without options: the default queries
    assert [(q["seed"], q["task"], q["object"], q["question"]) for q in build_query_set(SEEDS)] == \
        [(q["seed"], q["task"], q["object"], q["question"]) for q in build_queries(SEEDS)]


def test_phrasings_are_dealt_in_turn_and_absent_and_second_turn_queries():
    queries = build_query_set(SEEDS, every_object=True, phrasings="held_out", absent=True, second_turn=True)
    for task in ("rec", "res", "reg", "gc", "absent"):
        families = [q["phrasing"] for q in queries if q["task"] == task]
        assert families == [HELD_OUT_PHRASINGS[i % 2] for i in range(len(families))], task
    for q in queries:
        if q["task"] in ("rec", "res"):
            o = q["objects"][q["object"]]
            assert _family_shape_ok(q["phrasing"], q["question"], o["color"], o["shape"]), q["question"]
    absent = [q for q in queries if q["task"] == "absent"]
    assert len(absent) == len(SEEDS)
    for q in absent:
        present = {(o["color"], o["shape"]) for o in q["objects"]}
        assert tuple(q["absent"]) not in present
        assert _named_attributes(q["question"]) == ([q["absent"][0]], [q["absent"][1]])
    rec = [i for i, q in enumerate(queries) if q["task"] == "rec"]
    second = [q for q in queries if q["task"] == "rec_turn2"]
    assert sorted(q["pair"] for q in second) == rec
    for q in second:
        first = queries[q["pair"]]
        assert (q["seed"], q["object"], q["question"]) == (first["seed"], first["object"], first["question"])
        history = q["history"]
        assert [m["role"] for m in history] == ["user", "assistant"] and history[0]["content"].startswith("<image> ")
        assert "<image>" not in q["question"]
        refs = {int(i) for i in re.findall(r"\[(\d+)\]", history[0]["content"] + history[1]["content"])}
        assert refs == set(range(len(q["boxes"])))  # every history box is referred to
    assert {q["first_turn"] for q in second} == {"reg", "gc", "res"}


def test_relation_queries_name_every_object_an_unambiguous_relation_names():
    queries = build_query_set(range(1_000_000, 1_000_040), relations=True, phrasings="held_out")
    relation = [q for q in queries if q["task"] == "rec_relation"]
    assert len(relation) > 10
    pattern = re.compile(rf"the (left|right) one of the two (?:({COLOR_WORDS}) shapes|({SHAPE_WORDS})s)\b")
    asked = set()
    for q in relation:
        match = pattern.search(q["question"])
        side, color, shape = match.groups()
        group = [j for j, o in enumerate(q["objects"]) if o["color"] == color or o["shape"] == shape]
        assert len(group) == 2 and q["object"] in group
        centres = {j: (q["objects"][j]["box"][0] + q["objects"][j]["box"][2]) / 2 for j in group}
        other = group[0] if group[1] == q["object"] else group[1]
        assert (centres[q["object"]] < centres[other]) == (side == "left")
        assert q["phrasing"] == "indirect"  # postposed cannot word a relation
        asked.add((q["seed"], q["object"]))
    # every object that has a relation is asked once
    expected = {(s, k) for s in range(1_000_000, 1_000_040) for k, _ in enumerate(render_scene(s)[1])
                if relational_phrases(render_scene(s)[1], k)}
    assert asked == expected and len(asked) == len(relation)


def _perfect(q):
    o = q["objects"][q["object"]] if q["object"] is not None else None
    if q["task"] in ("rec", "res", "rec_turn2", "rec_relation"):
        return {"text": f"The {o['color']} {o['shape']}.",
                "entities": [{"text": "x", "box": o["box"], "mask": o["mask"]}]}
    if q["task"] == "reg":
        return {"text": f"A {o['color']} {o['shape']}.", "entities": []}
    if q["task"] == "absent":
        return {"text": f"There is no {q['absent'][0]} {q['absent'][1]}.", "entities": []}
    return {"text": "...",
            "entities": [{"text": f"a {o['color']} {o['shape']}", "box": o["box"]} for o in q["objects"]]}


def test_score_of_absent_and_second_turn_queries_by_hand():
    queries = build_query_set(range(1_000_000, 1_000_004), every_object=True, phrasings="held_out", absent=True,
                              second_turn=True, relations=True)
    assert any(q["task"] == "rec_relation" for q in queries)
    perfect = [_perfect(q) for q in queries]
    metrics = score(queries, perfect, intervals=True)
    for key in ("rec_acc@0.5", "res_mask_miou", "reg_exact_match", "gc_box_recall@0.5", "absent_no_box_rate",
                "absent_says_absent_rate", "absent_correct_rate", "rec_acc@0.5_first_turn", "rec_acc@0.5_second_turn",
                "rec_relation_acc@0.5"):
        assert metrics[key] == 1.0, key
    assert metrics["rec_acc@0.5_second_minus_first"] == 0.0
    assert metrics["num_queries"]["absent"] == 4
    assert metrics["num_queries"]["rec_turn2"] == metrics["num_queries"]["rec"]
    assert set(metrics["by_phrasing"]) == set(HELD_OUT_PHRASINGS)
    assert metrics["by_phrasing"]["postposed"]["rec_acc@0.5"] == 1.0
    n = metrics["num_queries"]["rec"]
    assert metrics["ci95"]["rec_acc@0.5"] == pytest.approx(wilson_interval(n, n))
    # by hand: absent replies [box + right text, no box + wrong text, no box + right text, no box + right text];
    # second turn: the first two second-turn replies miss
    results = list(perfect)
    absent = [i for i, q in enumerate(queries) if q["task"] == "absent"]
    o = queries[absent[0]]["objects"][0]
    results[absent[0]] = {"text": results[absent[0]]["text"], "entities": [{"text": "x", "box": o["box"]}]}
    results[absent[1]] = {"text": "A red circle.", "entities": []}
    second = [i for i, q in enumerate(queries) if q["task"] == "rec_turn2"]
    for i in second[:2]:
        results[i] = {"text": "", "entities": []}
    metrics = score(queries, results, intervals=True)
    assert metrics["absent_no_box_rate"] == 0.75
    assert metrics["absent_says_absent_rate"] == 0.75
    assert metrics["absent_correct_rate"] == 0.5
    assert metrics["ci95"]["absent_correct_rate"] == pytest.approx(wilson_interval(2, 4))
    assert metrics["rec_acc@0.5_first_turn"] == 1.0
    assert metrics["rec_acc@0.5_second_turn"] == pytest.approx(1 - 2 / n)
    assert metrics["rec_acc@0.5_second_minus_first"] == pytest.approx(-2 / n)
    assert metrics["rec_acc@0.5"] == 1.0  # the first-turn figures are not touched by second-turn replies
    # the default scorer's keys are those of earlier versions
    plain = build_queries(range(1_000_000, 1_000_004))
    default = score(plain, [_perfect(q) for q in plain])
    assert set(default) == {
        "rec_acc@0.5", "rec_miou", "rec_acc@0.5_with_distractor", "rec_distractor_fraction", "res_mask_miou",
        "res_mask_ciou", "res_box_acc@0.5", "res_mask_miou_where_box_hit", "reg_exact_match", "gc_box_recall@0.5",
        "gc_named_recall@0.5", "gc_box_precision@0.5", "num_queries"}


# ------------------------------------------------------------------------------------------------------------------
# the real inference path with a tiny random model
# ------------------------------------------------------------------------------------------------------------------




def test_evaluate_with_every_option_runs_the_real_inference_path():
    from nextchat import NextChatForConditionalGeneration
    from nextchat.training.synthetic import build_shapes_processor
    from nextchat.training.train import scratch_config

    processor = build_shapes_processor(image_size=IMAGE, patch_size=8, sam_image_size=IMAGE)
    torch.manual_seed(0)
    model = NextChatForConditionalGeneration(scratch_config(processor, TINY_SPEC)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    metrics = evaluate(model, processor, seed_start=1_000_003, num=2, batch_size=8, every_object=True,
                       phrasings="held_out", absent=True, second_turn=True, relations=True, scene_kwargs=SCENE)
    scenes = [render_scene(s, **SCENE)[1] for s in range(1_000_003, 1_000_005)]
    n_objects = sum(len(objects) for objects in scenes)
    n_relations = sum(bool(relational_phrases(objects, k)) for objects in scenes for k in range(len(objects)))
    assert n_relations > 0
    assert metrics["num_queries"] == {"rec": n_objects, "res": n_objects, "reg": n_objects, "gc": 2, "absent": 2,
                                      "rec_turn2": n_objects, "rec_relation": n_relations}
    for key in ("rec_acc@0.5", "absent_no_box_rate", "absent_correct_rate", "rec_acc@0.5_first_turn",
                "rec_acc@0.5_second_turn", "rec_relation_acc@0.5"):
        assert 0.0 <= metrics[key] <= 1.0, key
        lo, hi = metrics["ci95"][key]
        assert 0.0 <= lo <= metrics[key] <= hi <= 1.0, key
    assert set(metrics["by_phrasing"]) == set(HELD_OUT_PHRASINGS)


def test_eval_decodes_masks_for_segmentation_queries_only_and_boxes_do_not_depend_on_it():
    from nextchat import NextChatForConditionalGeneration
    from nextchat.processing import NextChatProcessor
    from nextchat.training.synthetic_eval import _messages, run_queries

    # the shipped model: it grounds, so rec, res and gc replies carry boxes
    model = NextChatForConditionalGeneration.from_pretrained(SHIPPED).eval()
    processor = NextChatProcessor.from_pretrained(SHIPPED)
    queries = build_query_set(range(1_000_010, 1_000_012), every_object=True)
    results = run_queries(model, processor, queries, batch_size=3)
    boxed = masked = 0
    for query, result in zip(queries, results):
        # the reference: one query alone, SAM inputs given, straight through generate + post-processing
        inputs = processor(images=[query["image"]], text=[processor.apply_chat_template(
            _messages(query), add_generation_prompt=True)], boxes=[query["boxes"]] if query["boxes"] else None,
            return_sam_pixel_values=True)
        sizes = inputs.pop("image_sizes")
        limit = 64 if query["task"] == "gc" else 16
        output = model.generate(**inputs, max_new_tokens=limit, do_sample=False, return_dict_in_generate=True,
                                pad_token_id=processor.tokenizer.pad_token_id or 0)
        reference = processor.post_process_generation(output, image_sizes=sizes)[0]
        assert result["text"] == reference["text"], query["task"]
        assert len(result["entities"]) == len(reference["entities"])
        for got, want in zip(result["entities"], reference["entities"]):
            if want.get("box") is not None:
                boxed += 1
                assert torch.allclose(torch.as_tensor(got["box"]), torch.as_tensor(want["box"]), atol=1e-3)
            # masks only where the task scores them
            assert (got.get("mask") is not None) == (query["task"] == "res" and want.get("mask") is not None)
            masked += got.get("mask") is not None
    assert boxed > masked > 0


def test_writing_with_several_workers_gives_the_same_files(tmp_path):
    """`write_dataset(num_workers=2)` (`--workers 2`): the JSONL file and every image are byte for byte those that
    one process writes, lines in seed order."""
    options = dict(phrasings="train", absent_fraction=0.3, relation_fraction=0.2, max_turns=2, mix_turn_tasks=True)
    one = write_dataset(str(tmp_path / "one"), range(100, 170), **options)
    synthetic_main([str(tmp_path / "two"), "--num", "70", "--seed-start", "100", "--phrasings", "train",
                    "--absent-fraction", "0.3", "--relation-fraction", "0.2", "--max-turns", "2", "--mix-turn-tasks",
                    "--workers", "2"])
    two = str(tmp_path / "two" / "data.jsonl")
    assert open(one, "rb").read() == open(two, "rb").read()
    assert [json.loads(line)["seed"] for line in open(two)] == list(range(100, 170))
    images = sorted(os.listdir(tmp_path / "one" / "images"))
    assert len(images) == 70 and images == sorted(os.listdir(tmp_path / "two" / "images"))
    for name in images:
        assert (open(tmp_path / "one" / "images" / name, "rb").read()
                == open(tmp_path / "two" / "images" / name, "rb").read()), name
    with pytest.raises(ValueError, match="num_workers"):
        write_dataset(str(tmp_path / "bad"), range(3), num_workers=0)
    with pytest.raises(SystemExit):
        synthetic_main([str(tmp_path / "bad"), "--num", "3", "--workers", "0"])
