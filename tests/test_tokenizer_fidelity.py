"""Token ids of converted original checkpoints against transformers 4.31's slow `LlamaTokenizer` (issue 20).

`Reference431` below is an independent statement of what 4.31's slow tokenizer did (reference/nextchat_original.md
§4.2), written with the `sentencepiece` package on the checkpoint's own `tokenizer.model`; nothing of `nextchat` is
used to compute the expected ids. The fixture (`../shared/fixtures/original_tiny`, `legacy: true`) and a copy of it
whose `tokenizer_config.json` says `legacy: false` are converted with `nextchat-convert`; for both, the plain
`tokenizer(text)` of the converted folder (`NextChatLlamaTokenizer`, loaded locally and as remote code in a process
without `nextchat`) and its `NextChatProcessor` must give the reference's ids, with no exception: with `legacy=False`
4.31 encoded a chunk that follows a token WITH the dummy prefix and then cut the `▁` off its first piece (`<boxes>
doing` -> `▁do` -> `do`, no piece of the tiny vocabulary -> `<unk>`), and it stripped with Python's `str.strip`
(U+001C..U+001F included) after reading a typed `▁` as a space.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st


spm = pytest.importorskip("sentencepiece")

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO.parent / "shared" / "fixtures" / "original_tiny"
SHIPPED = REPO / "examples" / "tiny-nextchat-shapes"
needs_fixture = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"original-format fixture not found at {FIXTURE}")
needs_shipped = pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="the shipped tiny model is absent")

SPIECE_UNDERLINE = "\u2581"
CONTROL = ("<im_patch>", "<im_start>", "<im_end>", "<at>", "<boxes>")
N_PATCHES = 16  # fixture README: CLIP image 56, patch 14
BLOCK = "<im_start>" + "<im_patch>" * N_PATCHES + "<im_end>"
SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)


# ----------------------------------------------------------------------------------------------------------
# the reference: transformers 4.31's slow LlamaTokenizer, from the reference text, with sentencepiece only
# ----------------------------------------------------------------------------------------------------------


class Reference431:
    """transformers 4.31 `LlamaTokenizer` (slow) as loaded from an original tokenizer folder.

    * `tokenize`: with `legacy=False` the text first becomes `"▁" + text.replace("▁", " ")`. It is split on the
      no-split tokens (the added tokens of `added_tokens.json` and the special tokens), earliest match first, the
      longest among those. Whitespace (`str.strip`) is stripped on both sides of a token that is a plain string
      (every added token: `from_pretrained` re-adds them as strings); a special token that is an `AddedToken`
      (a dict in `special_tokens_map.json` / `tokenizer_config.json`) strips only as its `lstrip`/`rstrip` say.
      Empty chunks are skipped.
    * each text chunk is encoded by SentencePiece on its own (`sp.encode(chunk, out_type=str)`, dummy prefix
      included). `legacy=True`: nothing else. `legacy=False`: the chunk that starts with the prepended `▁` (the
      very start) loses that `▁` before encoding; every other chunk that does not start with a space has the
      `▁` cut off its first piece after encoding (a piece that is only `▁` is dropped).
    * pieces become ids with `piece_to_id` (an unknown piece is `<unk>`), added tokens through
      `added_tokens.json`; BOS in front (`add_bos_token`).

    """

    def __init__(self, folder, legacy=None):
        folder = Path(folder)
        model = (folder / "tokenizer.model").read_bytes()
        self.sp = spm.SentencePieceProcessor(model_proto=model)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        special_map = self._json(folder / "special_tokens_map.json")
        self.added = {k: int(v) for k, v in self._json(folder / "added_tokens.json").items()}
        self.legacy = config.get("legacy") if legacy is None else legacy
        if self.legacy is None:
            self.legacy = True  # 4.31's default (with its warning)
        self.add_bos = config.get("add_bos_token", True)
        self.add_eos = config.get("add_eos_token", False)
        contents, flags = {}, {}
        for role, default in (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"), ("pad_token", None)):
            value = config.get(role, default)
            if isinstance(value, str):  # LlamaTokenizer.__init__ wraps these into AddedToken(lstrip=False, rstrip=False)
                value = {"content": value}
            if role in special_map:  # then set from special_tokens_map.json as they are
                value = special_map[role]
            if value is None:
                continue
            contents[role] = value["content"] if isinstance(value, dict) else value
            if isinstance(value, dict):
                flags[value["content"]] = (value.get("lstrip", False), value.get("rstrip", False))
        self.special = contents
        self.no_split = sorted(set(contents.values()) | set(self.added), key=len, reverse=True)
        self.strip = {t: flags.get(t, (True, True)) for t in self.no_split}

    @staticmethod
    def _json(path):
        return json.loads(path.read_text()) if path.is_file() else {}

    def _split(self, text):
        parts, buffer, i = [], "", 0
        while i < len(text):
            hit = next((t for t in self.no_split if text.startswith(t, i)), None)
            if hit is None:
                buffer += text[i]
                i += 1
                continue
            if buffer:
                parts.append(buffer)
            parts.append(hit)
            buffer = ""
            i += len(hit)
        if buffer:
            parts.append(buffer)
        return parts

    def _chunk(self, text):
        is_first = False
        if not self.legacy:
            is_first = text.startswith(SPIECE_UNDERLINE)
            if is_first:
                text = text[1:]
        cut = not self.legacy and not is_first and not text.startswith(" ")
        pieces = self.sp.encode(text, out_type=str)
        if cut and pieces and pieces[0].startswith(SPIECE_UNDERLINE):
            pieces = ([pieces[0][1:]] if len(pieces[0]) > 1 else []) + pieces[1:]
        return pieces

    def tokenize(self, text):
        if not self.legacy:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        parts = self._split(text)
        for i, part in enumerate(parts):
            if part in self.strip:
                lstrip, rstrip = self.strip[part]
                if rstrip and i + 1 < len(parts) and parts[i + 1]:
                    parts[i + 1] = parts[i + 1].lstrip()
                if lstrip and i > 0 and parts[i - 1]:
                    parts[i - 1] = parts[i - 1].rstrip()
        tokens = []
        for part in parts:
            if part in self.strip:
                tokens.append(part)
            elif part:
                tokens.extend(self._chunk(part))
        return tokens

    def __call__(self, text):
        ids = [self.added[t] if t in self.added else self.sp.piece_to_id(t) for t in self.tokenize(text)]
        bos = [self.sp.piece_to_id(self.special["bos_token"])] if self.add_bos else []
        eos = [self.sp.piece_to_id(self.special["eos_token"])] if self.add_eos else []
        return bos + ids + eos


def expand(text, n_patches=N_PATCHES):
    """The processor's syntax in 4.31 tokens: `<image>` -> image block, `[i,j]` -> one `<at> <boxes>` per index."""
    block = "<im_start>" + "<im_patch>" * n_patches + "<im_end>"
    text = text.replace("<image>", block)
    return re.sub(r"\[(\d+(?:,\d+)*)\]", lambda m: " ".join(["<at> <boxes>"] * len(m.group(1).split(","))), text)


def reference_labels(ref, expanded, ids, box_id):
    """Targets of a vicuna conversation: the tokens of every assistant answer (from after `ASSISTANT:` through its
    `</s>`), `<boxes>` excluded; positions found by tokenising the prefixes (chunks never merge across a space)."""
    labels = [-100] * len(ids)
    start = 0
    for match in re.finditer(re.escape("</s>"), expanded):
        marker = expanded.rfind("ASSISTANT:", start, match.start())
        if marker >= 0:
            a = len(ref(expanded[: marker + len("ASSISTANT:")]))
            b = len(ref(expanded[: match.end()]))
            for i in range(a, b):
                labels[i] = ids[i] if ids[i] != box_id else -100
        start = match.end()
    return labels


# ----------------------------------------------------------------------------------------------------------
# converted folders: the fixture (legacy true) and a copy of it with legacy false
# ----------------------------------------------------------------------------------------------------------


def _original_copy(dst: Path, legacy) -> Path:
    """The fixture, weights linked, with `legacy` set in tokenizer_config.json (`"absent"`: the key removed)."""
    dst.mkdir(parents=True)
    for item in FIXTURE.iterdir():
        if item.name != "tokenizer_config.json":
            (dst / item.name).symlink_to(item)
    config = json.loads((FIXTURE / "tokenizer_config.json").read_text())
    if legacy == "absent":
        config.pop("legacy", None)
    else:
        config["legacy"] = legacy
    (dst / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return dst


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """{legacy: namespace(original, folder, ref, raw, processor)} for legacy True (the fixture) and False."""
    if not FIXTURE.is_dir():
        pytest.skip(f"original-format fixture not found at {FIXTURE}")
    from transformers import AutoTokenizer

    from nextchat import NextChatProcessor
    from nextchat.convert_scripts import convert_original_checkpoint

    root = tmp_path_factory.mktemp("fidelity")
    out = {}
    for legacy in (True, False):
        original = FIXTURE if legacy else _original_copy(root / "original_false", False)
        folder = root / f"converted_{legacy}"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert_original_checkpoint(original, folder, progress=False)
            raw = AutoTokenizer.from_pretrained(folder)
            processor = NextChatProcessor.from_pretrained(folder)
        out[legacy] = SimpleNamespace(
            legacy=legacy,
            original=original,
            folder=folder,
            ref=Reference431(original),
            raw=raw,
            processor=processor,
        )
    return out


@pytest.fixture(params=[True, False], ids=["legacy-true", "legacy-false"])
def variant(request, converted):
    return converted[request.param]


def _assert_raw_matches(v, text):
    """The raw tokenizer gives the reference's ids, tokens included."""
    got = v.raw(text).input_ids
    assert got == v.ref(text), (text, v.raw.convert_ids_to_tokens(got), v.ref.tokenize(text))


def _process(processor, text, return_labels=False, append_trigger=False):
    import PIL.Image

    n_images = text.count("<image>")
    # live references only: an escaped `\[0]` (escape_text of a text that holds "[0]") is plain text
    n_boxes = len(re.findall(r"\d+", " ".join(re.findall(r"(?<!\\)\[[\d,]+\]", text))))
    out = processor(
        images=PIL.Image.new("RGB", (40, 30), (10, 200, 30)) if n_images else None,
        text=text,
        boxes=[[1, 2, 10, 20]] * n_boxes if n_boxes else None,
        return_labels=return_labels,
        append_trigger=append_trigger,
    )
    return out["input_ids"][0].tolist(), (out["labels"][0].tolist() if return_labels else None)


# ----------------------------------------------------------------------------------------------------------
# the reference itself
# ----------------------------------------------------------------------------------------------------------


@needs_fixture
def test_reference_reproduces_the_documented_ids():
    """Reference §4.2 (verified there by running the original code on the fixture) and issue 20."""
    legacy, non_legacy = Reference431(FIXTURE), Reference431(FIXTURE, legacy=False)
    assert legacy.legacy is True  # the fixture's tokenizer_config.json
    assert legacy.tokenize("<im_end> What is")[:3] == ["<im_end>", "▁W", "hat"]
    assert legacy.tokenize("<im_end> Describe")[:3] == ["<im_end>", "▁", "D"]
    issue = "USER: <im_start><im_patch><im_end> What is this object <at> <boxes> doing?"
    tokens = legacy.tokenize(issue)
    assert tokens[tokens.index("<im_end>") + 1 : tokens.index("<im_end>") + 3] == ["▁W", "hat"]
    assert tokens[tokens.index("<boxes>") + 1 :] == ["▁do", "in", "g", "?"]
    assert tokens[tokens.index("<im_start>") - 1] == ":"  # whitespace before an added token is stripped
    # legacy=False: no `▁` after a token; 4.31 cut it off the first piece (`▁do` -> `do`, no piece: <unk>)
    tokens = non_legacy.tokenize(issue)
    assert tokens[tokens.index("<im_end>") + 1 : tokens.index("<im_end>") + 3] == ["W", "hat"]
    assert tokens[tokens.index("<boxes>") + 1 :] == ["do", "in", "g", "?"]
    assert non_legacy(issue)[-4] == non_legacy.sp.unk_id()
    assert non_legacy.tokenize("<im_end> Describe")[:2] == ["<im_end>", "D"]
    # `</s>` is an AddedToken without lstrip/rstrip in this folder: split on, never stripped around
    assert legacy.tokenize("a</s> b") == ["▁a", "</s>", "▁", "▁b"]
    assert non_legacy.tokenize("a</s> b") == ["▁a", "</s>", "▁", "▁b"]
    assert non_legacy.tokenize("a</s>USER") == ["▁a", "</s>", "U", "S", "ER"]
    assert legacy.tokenize("a</s>USER") == ["▁a", "</s>", "▁", "U", "S", "ER"]
    # the very start: the dummy prefix under both flags; nothing for a text that starts with a token
    for ref in (legacy, non_legacy):
        assert ref.tokenize("What") == ["▁W", "hat"]
        assert ref.tokenize(" <at>x")[0] == "<at>"
        assert ref(" x") == [1] + ref.sp.encode(" x")


@needs_fixture
@pytest.mark.parametrize("legacy", [True, False, "absent"])
def test_converter_reads_the_flag(tmp_path, legacy):
    from nextchat.convert_scripts.convert_original_nextchat import read_original_tokenizer_settings

    original = FIXTURE if legacy is True else _original_copy(tmp_path / "original", legacy)
    settings = read_original_tokenizer_settings(original)
    assert settings["legacy"] is (legacy is not False)  # absent: 4.31's default, True
    assert settings["strip"]["<at>"] == (True, True) and settings["strip"]["</s>"] == (False, False)


# ----------------------------------------------------------------------------------------------------------
# converted folders: what is recorded, raw tokenizer, processor
# ----------------------------------------------------------------------------------------------------------


def test_flag_is_recorded_and_survives_save_load(variant, tmp_path):
    from transformers import AutoTokenizer

    from nextchat import NextChatProcessor

    assert json.loads((variant.folder / "tokenizer_config.json").read_text())["legacy"] is variant.legacy
    assert json.loads((variant.folder / "processor_config.json").read_text())["original_legacy"] is variant.legacy
    assert variant.processor.original_legacy is variant.legacy
    variant.processor.save_pretrained(tmp_path)
    again = NextChatProcessor.from_pretrained(tmp_path)
    assert again.original_legacy is variant.legacy
    text = "USER: <image> What is this object [0] doing?</s>USER: the end"
    assert _process(again, text)[0] == variant.ref(expand(text))
    raw = AutoTokenizer.from_pretrained(tmp_path)
    assert raw(expand(text)).input_ids == variant.raw(expand(text)).input_ids


RAW_CASES = [
    "USER: <im_start><im_patch><im_patch><im_end> What is this object <at> <boxes> doing?",  # issue 20
    *[f"a dog{t}What is this" for t in CONTROL + ("</s>", "<s>", "<unk>")],
    *[f"the cat {t} Describe the image" for t in CONTROL + ("</s>", "<s>", "<unk>")],
    *[f"x {t}  \n the" for t in CONTROL + ("</s>",)],
    # the very start
    "What", " What", "  What", "\nWhat", "<at> What", " <at> What", "<s>What", "</s> What", "</s>What", "", " ", "\n",
    f"{SPIECE_UNDERLINE}What {SPIECE_UNDERLINE} is",
    # repeated spaces, newlines, tabs, other spaces
    "a  b   c", "<at>   the   <boxes>  dog", "a\nb\n\nc", "x\n<at>\n y", "</s>\n\nUSER:", "a\tb <at>\tc", "a\u3000b <at>\u3000c",
    # non-ASCII and characters missing from the vocabulary
    "é漢 ok <at> é", "café <boxes>漢字 the", "x @#~ y <at>@@ <boxes> ~z", "<im_end>é", "</s>漢",
    # adjacent tokens
    "<at><boxes><at> <boxes>x", "<im_start><im_patch><im_end><at>", "</s></s> </s>",
    # a multi-turn vicuna conversation
    f"{SYSTEM} USER: {BLOCK} Where is the dog? ASSISTANT: Answer: <at> <boxes> .</s>USER: And the cat <at> <boxes>? "
    "ASSISTANT: It is here <at> <boxes> <at> <boxes> and there.</s>USER: Thanks. ASSISTANT:",
    # where 4.31 (legacy=False) cut the `▁` off a merged piece: `▁the` -> `the`, `▁do` -> `do` (no piece: <unk>)
    "<boxes>the end", "<at> the cat", "x <im_end> doing", "a</s>the", "</s>doing",
    # Python's str.strip: the separators U+001C..U+001F and other Unicode whitespace next to a token
    *[f"a{c}<at>{c}b" for c in "\x1c\x1d\x1e\x1f"],
    "a \x1f\x1c <boxes>\x1e\x1d the", "\x1f<at>\x1f", "x\x85<at>\xa0\u2028y", "a\x1f</s>\x1fb",
    # a typed `▁` next to a token (legacy=False reads it as a space, so it is stripped there)
    f"a{SPIECE_UNDERLINE}<at>{SPIECE_UNDERLINE}b", f"{SPIECE_UNDERLINE}<boxes>{SPIECE_UNDERLINE}{SPIECE_UNDERLINE}the",
    f"x {SPIECE_UNDERLINE} <im_end> {SPIECE_UNDERLINE}What", f"a</s>{SPIECE_UNDERLINE}b", f"{SPIECE_UNDERLINE}",
]


def test_raw_tokenizer_matches_reference(variant):
    from nextchat.processing import NextChatLlamaTokenizer

    assert isinstance(variant.raw, NextChatLlamaTokenizer) and variant.raw.legacy is variant.legacy
    for text in RAW_CASES:
        _assert_raw_matches(variant, text)
    # the issue's example: `<boxes> doing` is `▁do in g ?` with legacy=True, `<unk> in g ?` with legacy=False
    tokens = variant.raw.convert_ids_to_tokens(variant.raw(RAW_CASES[0]).input_ids)
    assert tokens[tokens.index("<boxes>") + 1 :] == (["▁do", "in", "g", "?"] if variant.legacy else ["<unk>", "in", "g", "?"])
    # the raw tokenizer, the processor and the reference agree on a prompt in the processor's syntax
    text = "USER: <image> What is this object [0] doing?</s>USER: the\x1f end"
    assert variant.raw(expand(text)).input_ids == variant.ref(expand(text)) == _process(variant.processor, text)[0]


def test_raw_tokenizer_conventions(variant):
    """Batches, padding, decoding, `add_special_tokens`, the saved files."""
    raw = variant.raw
    assert raw("a <at> b", add_special_tokens=False).input_ids == variant.ref("a <at> b")[1:]
    batch = raw(["a man <at> <boxes> riding", "x"], padding=True)
    n = len(variant.ref("x"))
    assert batch.input_ids[1][-n:] == variant.ref("x") and batch.attention_mask[1][0] == 0  # pads on the left
    assert batch.input_ids[1][0] == raw.pad_token_id == raw.unk_token_id
    ids = raw("a man <at> <boxes> riding</s>").input_ids
    assert raw.decode(ids, skip_special_tokens=True) == "a man <at> <boxes> riding"  # 4.31 joins added tokens with spaces
    config = json.loads((variant.folder / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "NextChatLlamaTokenizer"
    assert config["auto_map"]["AutoTokenizer"] == ["tokenization_nextchat.NextChatLlamaTokenizer", None]
    assert config["add_bos_token"] is True and config["add_eos_token"] is False
    source = (variant.folder / "tokenization_nextchat.py").read_text()
    assert "from ." not in source and "import nextchat" not in source and "from nextchat" not in source
    # the processor's chat template can mark the assistant tokens with this (Python) tokenizer
    import PIL.Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Where is it?"}]},
                {"role": "assistant", "content": "Here [0] ."}]
    out = variant.processor.apply_chat_template(
        messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True,
        images=[PIL.Image.new("RGB", (30, 30))], boxes=[[1, 1, 5, 5]],
    )
    ids, mask = list(out["input_ids"][0]), list(out["assistant_masks"][0])
    assert sum(mask) > 0 and mask[-1] == 1 and ids[-1] == raw.eos_token_id


def test_refresh_folder_refreshes_the_tokenizer_code(converted, tmp_path):
    from nextchat.remote_code import refresh_folder

    folder = tmp_path / "converted"
    shutil.copytree(converted[False].folder, folder)
    (folder / "tokenization_nextchat.py").write_text("# stale\n")
    assert "tokenization_nextchat.py" in refresh_folder(str(folder))
    source = Path(__file__).resolve().parents[1] / "processing" / "tokenization_nextchat.py"
    assert (folder / "tokenization_nextchat.py").read_text() == source.read_text()


PROCESSOR_CASES = [
    "USER: <image> What is this object [0] doing?",  # issue 20
    "<image> the [0] at",
    "  What <image>  the[0]the",
    "a dog</s> the cat</s>USER</s>",
    "x  y   z\n\n w <image>\n\n[0]\n\n.",
    "é漢 ok <image> é [0]漢 ~@",
    f"{SPIECE_UNDERLINE}x <image>{SPIECE_UNDERLINE}y [0]{SPIECE_UNDERLINE} z",
    "a\x1fb <image>\x1f[0]\x1f c",  # Python's whitespace (4.31 stripped with str.strip)
    "[0,1] and [2]<image>",
]


PROCESSOR_CASES_EXPANDED = [expand(text) for text in PROCESSOR_CASES]


def test_processor_matches_reference(variant):
    for text in PROCESSOR_CASES:
        ids, _ = _process(variant.processor, text)
        assert ids == variant.ref(expand(text)), (text, variant.processor.tokenizer.convert_ids_to_tokens(ids))
    # a prompt that asks for a box ends with the trigger, whitespace before it stripped as 4.31 strips it
    text = "USER: <image> Where is the dog? ASSISTANT: Answer: "
    assert _process(variant.processor, text, append_trigger=True)[0] == variant.ref(expand(text) + "<at>")


def test_processor_labels_cover_exactly_the_assistant_turns(variant):
    conversations = [
        f"{SYSTEM} USER: <image> Where is the dog? ASSISTANT: Answer: [0] .</s>",
        f"{SYSTEM} USER: <image> What is [0]? ASSISTANT: A dog [1] near [2] .</s>USER: And the cat? ASSISTANT: "
        "It is here [3], the end.</s>USER: Thanks! ASSISTANT:",
        f"{SYSTEM} USER: <image>\n describe ASSISTANT:  two  spaces\nand é漢</s>USER: more ASSISTANT: done</s>",
        "USER: <image> hi ASSISTANT: [0][1]</s>",
    ]
    box_id = variant.processor.box_token_id
    for text in conversations:
        ids, labels = _process(variant.processor, text, return_labels=True)
        expanded = expand(text)
        assert ids == variant.ref(expanded), text
        assert labels == reference_labels(variant.ref, expanded, ids, box_id), text
        assert any(label != -100 for label in labels)


# ----------------------------------------------------------------------------------------------------------
# fuzz
# ----------------------------------------------------------------------------------------------------------

_TOKENS = CONTROL + ("</s>", "<s>", "<unk>")
_RAW_ALPHABET = "ab cdeAS:UER?.\n\t é漢~@<>/" + "\u3000\x1c\x1d\x1e\x1f\x85\xa0" + SPIECE_UNDERLINE


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_raw_tokenizer(converted, data):
    legacy = data.draw(st.booleans(), label="legacy")
    words = st.sampled_from(["doing", "the", "What", "Describe", "is"])  # pieces 4.31 cut the `▁` off
    parts = data.draw(
        st.lists(st.one_of(st.text(alphabet=_RAW_ALPHABET, max_size=8), st.sampled_from(_TOKENS), words), max_size=8)
    )
    _assert_raw_matches(converted[legacy], "".join(parts))


_TEXT = st.text(alphabet="ab cdeAS:UER?.\n\t é漢~@[]0/\x1f" + SPIECE_UNDERLINE + "\u3000", max_size=10)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_processor(converted, data):
    from nextchat.processing import escape_text

    legacy = data.draw(st.booleans(), label="legacy")
    v = converted[legacy]
    segments = data.draw(
        st.lists(st.one_of(st.tuples(st.just("text"), _TEXT), st.just(("pair",)), st.just(("eos",))), max_size=7)
    )
    if data.draw(st.booleans()) or any(s[0] == "pair" for s in segments):
        segments.insert(data.draw(st.integers(0, len(segments))), ("image",))
    rendered, expanded, k = [], [], 0
    for seg in segments:
        if seg[0] == "text":
            rendered.append(escape_text(seg[1]))
            expanded.append(seg[1])
        elif seg[0] == "image":
            rendered.append("<image>")
            expanded.append(BLOCK)
        elif seg[0] == "pair":
            rendered.append(f"[{k}]")
            expanded.append("<at> <boxes>")
            k += 1
        else:
            rendered.append("</s>")
            expanded.append("</s>")
    ids, _ = _process(v.processor, "".join(rendered))
    assert ids == v.ref("".join(expanded)), (segments, v.processor.tokenizer.convert_ids_to_tokens(ids))


# ----------------------------------------------------------------------------------------------------------
# remote code, and the shipped tiny model
# ----------------------------------------------------------------------------------------------------------

REMOTE = textwrap.dedent(
    """
    import json, sys
    import PIL.Image
    from transformers import AutoProcessor, AutoTokenizer
    texts = json.load(open(sys.argv[-2]))
    out = {}
    for folder in sys.argv[1:-2]:
        processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
        raw = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        for obj in (processor, processor.tokenizer, raw):
            assert type(obj).__module__.startswith("transformers_modules."), type(obj).__module__
        assert type(raw).__name__ == type(processor.tokenizer).__name__ == "NextChatLlamaTokenizer"
        text = "USER: <image> What is this object [0] doing?</s>USER: a"
        ids = processor(images=PIL.Image.new("RGB", (40, 30)), text=text, boxes=[[1, 2, 10, 20]])["input_ids"][0]
        raw.save_pretrained(folder + "_resaved")  # a tokenizer loaded as remote code re-saves and re-loads
        again = AutoTokenizer.from_pretrained(folder + "_resaved", trust_remote_code=True)
        out[folder] = {"legacy": processor.original_legacy, "processor": ids.tolist(),
                       "raw": [raw(t).input_ids for t in texts], "resaved": [again(t).input_ids for t in texts]}
    assert not any(name.split(".")[0] == "nextchat" for name in sys.modules), "nextchat was imported"
    json.dump(out, open(sys.argv[-1], "w"))
    """
)


def test_remote_code_load_keeps_the_flag(converted, tmp_path):
    """Processor and raw tokenizer loaded through the Auto classes with `trust_remote_code=True` where `nextchat`
    cannot be imported: the reference's ids, also after the remote-code tokenizer re-saves itself."""
    from test_save_load import BLOCKER

    (tmp_path / "blocker.py").write_text(BLOCKER)
    (tmp_path / "remote.py").write_text(REMOTE)
    texts = RAW_CASES + PROCESSOR_CASES_EXPANDED
    (tmp_path / "texts.json").write_text(json.dumps(texts))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_OFFLINE="1")
    folders = []
    for legacy in (True, False):  # copies: the script writes `<folder>_resaved` next to each
        folders.append(tmp_path / f"converted_{legacy}")
        shutil.copytree(converted[legacy].folder, folders[-1])
    result = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "blocker.py"), str(tmp_path / "remote.py"), *map(str, folders),
         str(tmp_path / "texts.json"), str(tmp_path / "o.json")],
        cwd="/", env=env, capture_output=True, text=True, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    got = json.loads((tmp_path / "o.json").read_text())
    for legacy, folder in zip((True, False), folders):
        v = converted[legacy]
        entry = got[str(folder)]
        assert entry["legacy"] is legacy
        assert entry["processor"] == v.ref(expand("USER: <image> What is this object [0] doing?</s>USER: a"))
        for text, raw_ids, resaved_ids in zip(texts, entry["raw"], entry["resaved"]):
            assert raw_ids == resaved_ids == v.ref(text), (legacy, text)


# Ids the shipped tiny model's processor gave before issue 20 (its tokenizer is a transformers 5 LlamaTokenizer,
# Metaspace prepend_scheme "first": no `▁` after a control token): they must not change.
SHIPPED_PROMPTS = [
    (
        " USER: <image> Describe the image with object locations. ASSISTANT: a red circle [0] and a blue square [1]."
        "</s>USER:  Where is  it?\n ASSISTANT:",
        [1, 545, 297, 564],
        [592, 461, 262, 403, 526, 536, 447, 466, 563, 301, 564, 259, 393, 330, 643, 644, 400, 558, 259, 395, 331, 643,
         644, 563, 2, 286, 284, 564, 545, 438, 412, 545, 273, 548, 579, 13, 301, 564],
        [259, 393, 330, 643, 400, 558, 259, 395, 331, 643, 563, 2],
    ),
    (
        "USER: <image> What is [0]? ASSISTANT: It is the circle [0] .</s>",
        [1, 297, 564],
        [582, 320, 412, 643, 644, 579, 301, 564, 524, 548, 412, 262, 330, 643, 644, 563, 2],
        [524, 548, 412, 262, 330, 643, 563, 2],
    ),
    (
        f"<image>the [0]at [1] é漢 {SPIECE_UNDERLINE}x\tok",
        [1],
        [548, 260, 643, 644, 307, 643, 644, 198, 172, 233, 191, 165, 545, 545, 599, 12, 556, 586],
        [],
    ),
]


# the processor files of the tiny model shipped until 2026-12-05 (its tokenizer predates the phrasing families)
SHIPPED_2026_11 = Path(__file__).resolve().parent / "fixtures" / "shapes_processor_2026_11"


def test_shipped_tiny_model_keeps_its_ids():
    """A folder we shipped keeps its token ids: the processor files of the tiny model shipped until 2026-12-05 give
    the ids recorded from it then."""
    import PIL.Image

    from nextchat import NextChatProcessor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        processor = NextChatProcessor.from_pretrained(SHIPPED_2026_11)
    assert processor.original_legacy is None
    assert json.loads((SHIPPED_2026_11 / "processor_config.json").read_text()).get("original_legacy") is None
    n = processor.image_seq_length
    block = [processor.image_start_token_id] + [processor.image_token_id] * n + [processor.image_end_token_id]
    for k, (text, head, tail, targets) in enumerate(SHIPPED_PROMPTS):
        boxes = [[1, 2, 10, 20], [3, 3, 9, 9]][: len(set(re.findall(r"\[(\d)\]", text)))]
        out = processor(images=PIL.Image.new("RGB", (40, 30)), text=text, boxes=boxes, return_labels=True)
        ids, labels = out["input_ids"][0].tolist(), out["labels"][0].tolist()
        assert ids == head + block + tail, text
        assert [label for label in labels if label != -100] == targets, text
        if k == 1:  # on plain text, what its own tokenizer gives (its Metaspace does not double the `▁` of a
            # leading space as SentencePiece and the processor do, nor read a typed `▁` as the processor does)
            assert ids == processor.tokenizer(expand(text, n)).input_ids
