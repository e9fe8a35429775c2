"""Tests of `nextchat-convert` on the tiny original-format checkpoint of `../shared/fixtures/original_tiny`.

The big test (`test_forward_matches_independent_original_forward`) compares the converted model with a plain-torch
re-implementation of the ORIGINAL forward written here from `reference/nextchat_original.md` (nothing imported from
`nextchat`): transformers' `LlamaModel` / `CLIPVisionModel` and segment-anything's SAM modules are used only as the
building blocks the original also used; projector, image-feature placement, `loc_encoder` at `<boxes>`,
`loc_decoder` at `<at>`, `seg_prompt_mlp`, and the SAM call (4 + 2 sparse tokens, no-mask dense embedding, single
mask) are written out below.
"""

import json
import re
import shutil
import warnings
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file


FIXTURE = Path(__file__).resolve().parents[1].parent / "shared" / "fixtures" / "original_tiny"
pytestmark = pytest.mark.skipif(not FIXTURE.is_dir(), reason=f"original-format fixture not found at {FIXTURE}")

ADDED = {"<im_patch>": 128, "<im_start>": 129, "<im_end>": 130, "<at>": 131, "<boxes>": 132}  # fixture README


# ----------------------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------------------


def _original_state_dict():
    return load_file(str(FIXTURE / "model.safetensors"))


def _make_original(dst: Path, state_dict: dict, fmt: str = "safetensors", num_shards: int = 3) -> Path:
    """A copy of the fixture folder whose weights are `state_dict`, stored as safetensors, one .bin, or .bin shards."""
    # plain copies (the fixture is read-only; its modes must not follow, or the copy could not be written to)
    for source in FIXTURE.rglob("*"):
        if source.is_file() and source.name not in ("model.safetensors", "README.md"):
            target = dst / source.relative_to(FIXTURE)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, target)
    if fmt == "safetensors":
        save_file(state_dict, str(dst / "model.safetensors"), metadata={"format": "pt"})
    elif fmt == "bin":
        torch.save(state_dict, dst / "pytorch_model.bin")
    elif fmt == "shards":
        keys = list(state_dict)
        chunks = [keys[i::num_shards] for i in range(num_shards)]
        weight_map = {}
        total = 0
        for i, chunk in enumerate(chunks):
            name = f"pytorch_model-{i + 1:05d}-of-{num_shards:05d}.bin"
            torch.save({k: state_dict[k] for k in chunk}, dst / name)
            weight_map.update({k: name for k in chunk})
            total += sum(state_dict[k].numel() * state_dict[k].element_size() for k in chunk)
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (dst / "pytorch_model.bin.index.json").write_text(json.dumps(index, indent=2))
    else:
        raise ValueError(fmt)
    return dst


def _load_converted(folder: Path) -> dict:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    tensors = {}
    for name in files:
        tensors.update(load_file(str(folder / name)))
    return tensors


def _convert(original, output, **kwargs):
    from nextchat.convert_scripts import convert_original_checkpoint

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert_original_checkpoint(original, output, progress=False, **kwargs)


# Independent statement of the key mapping of CONTRACT.md (original -> converted).
_RULES = [
    (r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$", None),
    (r"^model\.(embed_tokens|layers|norm)\.(.*)$", r"model.language_model.\1.\2"),
    (r"^model\.mm_projector\.(.*)$", r"model.mm_projector.\1"),
    (r"^model\.vision_tower\.vision_model\.(.*)$", r"model.vision_tower.\1"),
    (r"^loc_encoder\.(.*)$", r"model.loc_encoder.\1"),
    (r"^(lm_head|loc_decoder|seg_prompt_mlp)\.(.*)$", r"\1.\2"),
    (r"^sam\.model\.(.*)$", r"sam.\1"),
]


def _expected_name(key):
    for pattern, replacement in _RULES:
        if re.match(pattern, key):
            return None if replacement is None else re.sub(pattern, replacement, key)
    raise AssertionError(f"no rule for {key}")


# ----------------------------------------------------------------------------------------------------------
# shared conversions (module scope: each conversion runs once)
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("convert")


@pytest.fixture(scope="module")
def original_sd():
    return _original_state_dict()


@pytest.fixture(scope="module")
def converted(workdir, original_sd):
    """The fixture converted from safetensors (as shipped), from one .bin and from .bin shards with an index."""
    outputs = {"safetensors": _convert(FIXTURE, workdir / "out_safetensors")}
    for fmt in ("bin", "shards"):
        original = _make_original(workdir / f"orig_{fmt}", original_sd, fmt)
        outputs[fmt] = _convert(original, workdir / f"out_{fmt}")
    return outputs


@pytest.fixture(scope="module")
def model(converted):
    from nextchat import NextChatForConditionalGeneration

    return NextChatForConditionalGeneration.from_pretrained(str(converted["safetensors"])).eval()


# ----------------------------------------------------------------------------------------------------------
# weights, config, files
# ----------------------------------------------------------------------------------------------------------


def test_three_input_formats_give_identical_folders(converted):
    reference = _load_converted(converted["safetensors"])
    ref_config = json.loads((converted["safetensors"] / "config.json").read_text())
    for fmt in ("bin", "shards"):
        tensors = _load_converted(converted[fmt])
        assert tensors.keys() == reference.keys(), fmt
        for key, value in reference.items():
            assert torch.equal(tensors[key], value), (fmt, key)
        assert json.loads((converted[fmt] / "config.json").read_text()) == ref_config, fmt
        for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json"):
            assert (converted[fmt] / name).read_text() == (converted["safetensors"] / name).read_text(), (fmt, name)


def test_every_converted_tensor_equals_its_source(converted, original_sd):
    tensors = _load_converted(converted["safetensors"])
    expected = {}
    for key, value in original_sd.items():
        name = _expected_name(key)
        if name is not None:
            expected[name] = value
    assert set(tensors) == set(expected)
    for name, value in expected.items():
        assert tensors[name].dtype == value.dtype, name
        assert torch.equal(tensors[name], value), name
    # the only dropped tensors are the rotary buffers
    dropped = [k for k in original_sd if _expected_name(k) is None]
    assert dropped and all(k.endswith("rotary_emb.inv_freq") for k in dropped)


def test_config_is_inferred_from_checkpoint(converted):
    from nextchat import NextChatConfig

    config = NextChatConfig.from_pretrained(str(converted["safetensors"]))
    # token ids from added_tokens.json, sizes from the fixture README
    assert config.image_token_id == 128 and config.image_start_token_id == 129 and config.image_end_token_id == 130
    assert config.trigger_token_id == 131 and config.box_token_id == 132
    assert config.text_config.vocab_size == 133 and config.text_config.hidden_size == 64
    assert config.text_config.num_hidden_layers == 2 and config.text_config.num_attention_heads == 4
    assert config.text_config.intermediate_size == 128 and not config.text_config.tie_word_embeddings
    assert config.vision_config.hidden_size == 1024 and config.vision_config.image_size == 56
    assert config.vision_config.patch_size == 14 and config.vision_config.num_attention_heads == 4
    assert not hasattr(config.vision_config, "at_token")  # run-time attributes of the original are dropped
    assert config.image_seq_length == 16
    assert config.vision_feature_layer == -2 and config.projector_depth == 2 and config.num_seg_prompt_tokens == 4
    assert config.sam_config == {
        "image_size": 1024,
        "patch_size": 16,
        "encoder_embed_dim": 32,
        "encoder_depth": 2,
        "encoder_num_heads": 2,
        "encoder_global_attn_indexes": [1],
        "window_size": 14,
        "prompt_embed_dim": 256,
    }
    generation = json.loads((converted["safetensors"] / "generation_config.json").read_text())
    assert generation["num_beams"] == 1 and generation["do_sample"] is False
    assert generation["eos_token_id"] == 2 and generation["pad_token_id"] == 0
    card = (converted["safetensors"] / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: transformers" in front and "pipeline_tag: image-text-to-text" in front
    assert "license:" in front


# ----------------------------------------------------------------------------------------------------------
# tokenizer
# ----------------------------------------------------------------------------------------------------------


def _reference_ids_431(text, sp):
    """Ids as transformers 4.31's slow LlamaTokenizer gave them for this fixture (reference §4.2; its
    tokenizer_config.json says `legacy: true`): BOS; whitespace on both sides of an added token stripped; every text
    chunk encoded by SentencePiece on its own, with the dummy `▁` prefix. Both flags, `</s>` and more cases:
    tests/test_tokenizer_fidelity.py."""
    pattern = "(" + "|".join(re.escape(t) for t in ADDED) + ")"
    parts = re.split(pattern, text)
    ids = [1]
    for i, part in enumerate(parts):
        if part in ADDED:
            ids.append(ADDED[part])
            continue
        if i > 0:
            part = part.lstrip()
        if i < len(parts) - 1:
            part = part.rstrip()
        if not part:
            continue
        ids += sp.encode(part)
    return ids


def test_tokenizer_ids_match_original(converted):
    import sentencepiece as spm
    from transformers import AutoTokenizer, LlamaTokenizer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        original = LlamaTokenizer.from_pretrained(str(FIXTURE))
        new = AutoTokenizer.from_pretrained(str(converted["safetensors"]))
    sp = spm.SentencePieceProcessor(model_file=str(FIXTURE / "tokenizer.model"))

    for token, token_id in ADDED.items():
        assert original.convert_tokens_to_ids(token) == token_id
        assert new.convert_tokens_to_ids(token) == token_id
    # plain text: exactly the original tokenizer's ids
    for text in ["hello world", "A chat between a curious user and an assistant.", "Where is the cat? Answer: yes"]:
        assert new(text).input_ids == original(text).input_ids, text
    # text around added tokens: 4.31's ids (transformers 5 alone would put a `▁` before each added token)
    texts = [
        "USER: <im_start><im_patch><im_patch><im_end> Where is the cat? ASSISTANT: Answer: <at> <boxes> .",
        "What is region <at> <boxes>? a dog <at> <boxes> <at> <boxes> and grass.",
        "<at><boxes>x",
    ]
    for text in texts:
        assert new(text).input_ids == _reference_ids_431(text, sp), text
    # decoding keeps <at> <boxes> (they are not special tokens, as in the original)
    decoded = new.decode(new("a dog <at> <boxes> .").input_ids, skip_special_tokens=True)
    assert "<at>" in decoded and "<boxes>" in decoded


# ----------------------------------------------------------------------------------------------------------
# forward parity with an independent implementation of the original
# ----------------------------------------------------------------------------------------------------------


class OriginalNextChatReference:
    """The original `NextChatForSegLM` forward, from `reference/nextchat_original.md` §1, §3, §6, in plain torch."""

    def __init__(self, folder: Path):
        from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
        from transformers import CLIPVisionConfig, CLIPVisionModel, LlamaConfig, LlamaModel

        sd = load_file(str(folder / "model.safetensors"))
        self.sd = sd
        cfg = json.loads((folder / "config.json").read_text())
        self.select_layer = cfg["mm_vision_select_layer"]

        llama_cfg = LlamaConfig(
            **{k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                   "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                   "rms_norm_eps", "hidden_act")},
            attn_implementation="eager",
        )
        self.llama = LlamaModel(llama_cfg).eval()
        llama_sd = {k[len("model."):]: v for k, v in sd.items()
                    if k.startswith(("model.embed_tokens", "model.layers", "model.norm")) and "inv_freq" not in k}
        self.llama.load_state_dict(llama_sd, strict=True)

        clip_raw = json.loads((folder / cfg["mm_vision_tower"] / "config.json").read_text())
        clip_cfg = CLIPVisionConfig(**{k: clip_raw[k] for k in (
            "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads", "image_size",
            "patch_size", "hidden_act", "layer_norm_eps", "projection_dim", "num_channels")}, attn_implementation="eager")
        self.clip = CLIPVisionModel(clip_cfg).eval()
        names = set(self.clip.state_dict())
        clip_sd = {}
        for k, v in sd.items():
            if k.startswith("model.vision_tower."):
                name = k[len("model.vision_tower."):]
                if name not in names:  # transformers 5 dropped the `vision_model.` level
                    name = name[len("vision_model."):]
                clip_sd[name] = v
        self.clip.load_state_dict(clip_sd, strict=True)

        # SAM sizes from the fixture README (image 1024, patch 16, embed 32, depth 2, 2 heads, window 14, global
        # block 1) and segment-anything's standard prompt encoder / mask decoder.
        self.sam = Sam(
            image_encoder=ImageEncoderViT(
                depth=2, embed_dim=32, img_size=1024, mlp_ratio=4, norm_layer=partial(torch.nn.LayerNorm, eps=1e-6),
                num_heads=2, patch_size=16, qkv_bias=True, use_rel_pos=True, global_attn_indexes=(1,),
                window_size=14, out_chans=256,
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=256, image_embedding_size=(64, 64), input_image_size=(1024, 1024), mask_in_chans=16
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256,
            ),
        ).eval()
        self.sam.load_state_dict({k[len("sam.model."):]: v for k, v in sd.items() if k.startswith("sam.model.")},
                                 strict=True)

    def _mlp(self, prefix, x, act):
        x = F.linear(x, self.sd[prefix + ".0.weight"], self.sd[prefix + ".0.bias"])
        return F.linear(act(x), self.sd[prefix + ".2.weight"], self.sd[prefix + ".2.bias"])

    @torch.no_grad()
    def forward(self, input_ids, images, loc_inputs, images_sam):
        sd = self.sd
        # CLIP: hidden states of layer mm_vision_select_layer, CLS dropped; projector Linear-GELU-Linear
        feats = self.clip(images, output_hidden_states=True).hidden_states[self.select_layer][:, 1:]
        feats = self._mlp("model.mm_projector", feats, F.gelu)
        n_patches = feats.shape[1]
        embeds = sd["model.embed_tokens.weight"][input_ids].clone()
        # image features replace the n positions after each <im_start>; <im_end> must follow them
        image_index = 0
        for b, pos in torch.nonzero(input_ids == ADDED["<im_start>"]).tolist():
            assert input_ids[b, pos + n_patches + 1] == ADDED["<im_end>"]
            embeds[b, pos + 1 : pos + 1 + n_patches] = feats[image_index]
            image_index += 1
        # every <boxes> gets loc_encoder(box), boxes in row-major order of appearance
        box_pos = torch.nonzero(input_ids == ADDED["<boxes>"])
        box_embeds = self._mlp("loc_encoder", loc_inputs, F.relu)
        for k, (b, pos) in enumerate(box_pos.tolist()):
            embeds[b, pos] = box_embeds[k]
        hidden = self.llama(inputs_embeds=embeds).last_hidden_state  # final-norm hidden states
        logits = F.linear(hidden, sd["lm_head.weight"])
        at_pos = torch.nonzero(input_ids == ADDED["<at>"])
        h_at = hidden[at_pos[:, 0], at_pos[:, 1]]
        boxes = self._mlp("loc_decoder", h_at, F.relu)  # no sigmoid
        prompt = self._mlp("seg_prompt_mlp", h_at, F.relu).view(h_at.shape[0], 4, 256)
        # SamForLMSeg.forward: encoder, box prompt (box x 1024), sparse = cat(4 LLM tokens, 2 box tokens),
        # dense = no-mask embedding, multimask_output=False
        image_embeddings = self.sam.image_encoder(images_sam)
        box_sparse, dense = self.sam.prompt_encoder(points=None, boxes=boxes * 1024, masks=None)
        sparse = torch.cat([prompt, box_sparse], dim=1)
        low_res, iou = self.sam.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.sam.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=False,
        )
        return {"logits": logits, "boxes": boxes, "prompt": prompt, "low_res": low_res[:, 0], "iou": iou[:, 0],
                "trigger_positions": at_pos}


def _example_inputs():
    generator = torch.Generator().manual_seed(0)
    A = ADDED
    ids = (
        [1, 7, 9, 11, 4, A["<im_start>"]] + [A["<im_patch>"]] * 16 + [A["<im_end>"], 20, 21, 22]
        + [A["<at>"], A["<boxes>"], 30, 31, 40, 41, A["<at>"], A["<boxes>"], 50, A["<at>"], A["<boxes>"], 60, 2]
    )
    input_ids = torch.tensor([ids])
    pixel_values = torch.randn(1, 3, 56, 56, generator=generator)
    boxes = torch.tensor([[0.1, 0.2, 0.5, 0.6], [0.3, 0.25, 0.9, 0.8], [0.0, 0.5, 0.4, 1.0]])
    sam_pixel_values = torch.randn(1, 3, 1024, 1024, generator=generator)
    return input_ids, pixel_values, boxes, sam_pixel_values


def test_forward_matches_independent_original_forward(model):
    input_ids, pixel_values, boxes, sam_pixel_values = _example_inputs()
    reference = OriginalNextChatReference(FIXTURE).forward(input_ids, pixel_values, boxes, sam_pixel_values)

    prompts = []
    hook = model.seg_prompt_mlp.register_forward_hook(lambda module, args, out: prompts.append(out))
    try:
        with torch.no_grad():
            out = model(
                input_ids=input_ids,
                pixel_values=pixel_values,
                box_inputs=boxes[None],
                box_inputs_mask=torch.ones(1, 3, dtype=torch.bool),
                sam_pixel_values=sam_pixel_values,
            )
    finally:
        hook.remove()
    tol = dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.logits, reference["logits"], **tol)
    assert out.trigger_positions.tolist() == reference["trigger_positions"].tolist()
    torch.testing.assert_close(out.pred_boxes, reference["boxes"], **tol)
    assert len(prompts) == 1
    torch.testing.assert_close(prompts[0].view(-1, 4, 256), reference["prompt"], **tol)
    assert out.pred_masks.shape == (3, 256, 256)
    torch.testing.assert_close(out.pred_masks, reference["low_res"], **tol)
    torch.testing.assert_close(out.iou_scores, reference["iou"], **tol)
    # guard against a vacuous comparison: the masks and boxes are not constant
    assert reference["low_res"].std() > 1e-3 and reference["boxes"].std() > 1e-3


# ----------------------------------------------------------------------------------------------------------
# errors: missing, unexpected, mis-shaped keys; SAM from a separate checkpoint
# ----------------------------------------------------------------------------------------------------------


def _expect_error(tmp_path, state_dict, *fragments, **kwargs):
    from nextchat.convert_scripts import ConversionError

    original = _make_original(tmp_path / "orig", state_dict)
    output = tmp_path / "out"
    with pytest.raises(ConversionError) as info:
        _convert(original, output, **kwargs)
    for fragment in fragments:
        assert fragment in str(info.value), (fragment, str(info.value))
    assert not output.exists(), "nothing may be written when the conversion stops"
    return str(info.value)


def test_shard_index_that_does_not_match_its_shards_is_reported(tmp_path, original_sd):
    from nextchat.convert_scripts import CheckpointReader, ConversionError

    original = _make_original(tmp_path / "orig", original_sd, "shards")
    index_path = original / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    moved = index["weight_map"].pop("lm_head.weight")
    index["weight_map"]["lm_head.weigth"] = moved
    index_path.write_text(json.dumps(index))
    with pytest.raises(ConversionError) as info:
        CheckpointReader(original, progress=False)
    assert "lm_head.weigth" in str(info.value) and "lm_head.weight" in str(info.value)


def test_missing_keys_are_listed(tmp_path, original_sd):
    sd = dict(original_sd)
    del sd["loc_decoder.2.bias"], sd["sam.model.mask_decoder.iou_token.weight"]
    message = _expect_error(tmp_path, sd, "missing keys", "loc_decoder.2.bias", "sam.mask_decoder.iou_token.weight")
    assert "unexpected" not in message


def test_unexpected_keys_are_listed(tmp_path, original_sd):
    sd = dict(original_sd)
    sd["loc_decoder.4.weight"] = torch.zeros(4, 4)  # follows a known prefix but the model has no such tensor
    _expect_error(tmp_path / "a", sd, "unexpected keys", "loc_decoder.4.weight")
    sd = dict(original_sd)
    sd["model.some_adapter.weight"] = torch.zeros(2)  # not NExT-Chat at all
    _expect_error(tmp_path / "b", sd, "unexpected keys", "model.some_adapter.weight")


def test_misshaped_keys_are_listed(tmp_path, original_sd):
    sd = dict(original_sd)
    sd["loc_encoder.2.bias"] = torch.zeros(65)
    _expect_error(tmp_path, sd, "mis-shaped", "loc_encoder.2.bias", "[65]", "[64]")


def test_old_clip_position_ids_buffer_is_checked_and_dropped(tmp_path, original_sd, converted):
    sd = dict(original_sd)
    sd["model.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    output = _convert(_make_original(tmp_path / "a" / "orig", sd), tmp_path / "a" / "out")
    reference = _load_converted(converted["safetensors"])
    assert _load_converted(output).keys() == reference.keys()
    sd["model.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None] + 1
    _expect_error(tmp_path / "b", sd, "position_ids")


def test_sam_from_separate_checkpoint(tmp_path, original_sd, converted):
    sam = {k[len("sam.model."):]: v for k, v in original_sd.items() if k.startswith("sam.model.")}
    without_sam = {k: v for k, v in original_sd.items() if not k.startswith("sam.model.")}
    # seg_prompt_mlp without SAM: --sam-checkpoint is required, and the error says so
    _expect_error(tmp_path / "a", without_sam, "--sam-checkpoint")
    # with the official-layout SAM checkpoint the result equals the conversion of the full checkpoint
    sam_path = tmp_path / "sam_vit_tiny.pth"
    torch.save(sam, sam_path)
    original = _make_original(tmp_path / "b" / "orig", without_sam)
    output = _convert(original, tmp_path / "b" / "out", sam_checkpoint=str(sam_path))
    reference = _load_converted(converted["safetensors"])
    tensors = _load_converted(output)
    assert tensors.keys() == reference.keys()
    assert all(torch.equal(tensors[k], reference[k]) for k in reference)


def test_clip_weights_from_vision_tower_when_checkpoint_has_none(tmp_path, original_sd, converted):
    # a CLIP folder in the transformers-4 layout (`vision_model.*`), as a full CLIPModel file would hold it
    clip = {"vision_model." + k[len("model.vision_tower.vision_model."):]: v
            for k, v in original_sd.items() if k.startswith("model.vision_tower.")}
    clip["vision_model.embeddings.position_ids"] = torch.arange(17)[None]  # buffer stored by old files
    clip["text_model.embeddings.token_embedding.weight"] = torch.zeros(3, 4)  # text tower: not used
    tower = tmp_path / "clip"
    tower.mkdir()
    shutil.copyfile(FIXTURE / "clip_vision_tower" / "config.json", tower / "config.json")
    save_file(clip, str(tower / "model.safetensors"))
    without = {k: v for k, v in original_sd.items() if not k.startswith("model.vision_tower.")}
    original = _make_original(tmp_path / "orig", without)
    output = _convert(original, tmp_path / "out", vision_tower=str(tower))
    reference = _load_converted(converted["safetensors"])
    tensors = _load_converted(output)
    assert tensors.keys() == reference.keys()
    assert all(torch.equal(tensors[k], reference[k]) for k in reference)


def test_vision_config_from_a_full_clip_config(tmp_path):
    """A transformers-4 `CLIPModel` config.json (as in openai/clip-vit-large-patch14-336): vision sub-config, legacy
    `vision_config_dict` overrides, generic legacy keys."""
    from nextchat.convert_scripts.convert_original_nextchat import build_vision_config

    config = {
        "model_type": "clip",
        "architectures": ["CLIPModel"],
        "text_config": {"hidden_size": 768},
        "vision_config": {"hidden_size": 1024, "image_size": 224, "patch_size": 14, "num_hidden_layers": 24,
                          "num_attention_heads": 16, "intermediate_size": 4096, "bad_words_ids": None,
                          "model_type": "clip_vision_model", "hidden_act": "quick_gelu"},
        "vision_config_dict": {"image_size": 336, "projection_dim": 768},
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    vision = build_vision_config(tmp_path)
    assert (vision.hidden_size, vision.image_size, vision.patch_size, vision.num_hidden_layers) == (1024, 336, 14, 24)
    assert vision.num_attention_heads == 16 and vision.hidden_act == "quick_gelu" and vision.projection_dim == 768
    assert not hasattr(vision, "bad_words_ids")


def test_unresolvable_vision_tower_names_the_option(tmp_path, original_sd):
    original = _make_original(tmp_path / "orig", original_sd)
    config = json.loads((original / "config.json").read_text())
    config["mm_vision_tower"] = "/home/authors/models/clip-vit-large-patch14-336"  # as in the published config
    (original / "config.json").write_text(json.dumps(config))
    from nextchat.convert_scripts import ConversionError

    with pytest.raises(ConversionError, match="--vision-tower openai/clip-vit-large-patch14-336"):
        _convert(original, tmp_path / "out")


def test_box_only_checkpoint_converts_without_sam(tmp_path, original_sd):
    sd = {k: v for k, v in original_sd.items() if not k.startswith(("sam.model.", "seg_prompt_mlp."))}
    original = _make_original(tmp_path / "orig", sd)
    from nextchat.convert_scripts import convert_original_checkpoint

    with pytest.warns(UserWarning, match="box-only"):
        output = convert_original_checkpoint(original, tmp_path / "out", progress=False)
    config = json.loads((output / "config.json").read_text())
    assert config["sam_config"] is None
    assert not any(k.startswith(("sam.", "seg_prompt_mlp.")) for k in _load_converted(output))


# ----------------------------------------------------------------------------------------------------------
# CLI, dtype, shards, push to hub
# ----------------------------------------------------------------------------------------------------------


def test_cli_dtype_and_shards(tmp_path, original_sd):
    from nextchat.convert_scripts import main

    output = tmp_path / "out"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        code = main([str(FIXTURE), str(output), "--dtype", "bf16", "--max-shard-size", "20MB", "--no-progress"])
    assert code == 0
    index = json.loads((output / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    tensors = _load_converted(output)
    for key, value in original_sd.items():
        name = _expected_name(key)
        if name is not None:
            assert tensors[name].dtype == torch.bfloat16, name
            assert torch.equal(tensors[name], value.to(torch.bfloat16)), name
    assert json.loads((output / "config.json").read_text())["dtype"] == "bfloat16"


def test_cli_reports_errors(tmp_path, capsys):
    from nextchat.convert_scripts import main

    code = main([str(tmp_path / "does_not_exist"), str(tmp_path / "out"), "--no-progress"])
    assert code == 2
    assert "nextchat-convert: error:" in capsys.readouterr().err


def test_push_to_hub_uses_hf_api(converted):
    """Argument wiring only: a recording `HfApi`, then a real one pointed at a dead local endpoint (no network)."""
    from huggingface_hub import HfApi

    from nextchat.convert_scripts import push_folder_to_hub

    calls = []

    class RecordingApi(HfApi):
        def create_repo(self, repo_id, **kwargs):
            calls.append(("create_repo", repo_id, kwargs))
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def upload_folder(self, **kwargs):
            calls.append(("upload_folder", kwargs))
            return "commit"

    push_folder_to_hub(converted["safetensors"], "someone/nextchat-tiny", private=True, api=RecordingApi())
    assert calls[0][0] == "create_repo" and calls[0][1] == "someone/nextchat-tiny"
    assert calls[0][2]["private"] is True and calls[0][2]["exist_ok"] is True
    assert calls[1][0] == "upload_folder"
    assert calls[1][1]["folder_path"] == str(converted["safetensors"])
    assert calls[1][1]["repo_id"] == "someone/nextchat-tiny"

    dead = HfApi(endpoint="http://127.0.0.1:9", token="hf_not_a_real_token")
    with pytest.raises(Exception) as info:
        push_folder_to_hub(converted["safetensors"], "someone/nextchat-tiny", api=dead)
    assert "refused" in str(info.value).lower() or "connect" in type(info.value).__name__.lower()


# ----------------------------------------------------------------------------------------------------------
# the converted folder on its own: remote code, offline Hub-style snapshot, `nextchat` not importable
# ----------------------------------------------------------------------------------------------------------

_REMOTE_SCRIPT = r'''
import importlib.abc, sys


class _BlockNextChat(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "nextchat" or name.startswith("nextchat."):
            raise ImportError(f"{name} is blocked in this process")


sys.meta_path.insert(0, _BlockNextChat())
import torch
from transformers import AutoModelForImageTextToText, AutoTokenizer

repo, inputs_path, result_path = sys.argv[1:4]
model = AutoModelForImageTextToText.from_pretrained(repo, trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(repo, trust_remote_code=True)
assert type(tokenizer).__module__.startswith("transformers_modules."), type(tokenizer).__module__
assert not any(name.split(".")[0] == "nextchat" for name in sys.modules), "nextchat was imported"
inputs = torch.load(inputs_path)
with torch.no_grad():
    out = model(**inputs)
torch.save({"logits": out.logits, "pred_boxes": out.pred_boxes, "class": type(model).__module__,
            "ids": tokenizer("USER: <im_start><im_end> Where? ASSISTANT: Answer: <at> <boxes> .").input_ids}, result_path)
'''


def test_converted_folder_loads_offline_from_hub_snapshot_without_nextchat(converted, model, tmp_path):
    import os
    import subprocess
    import sys

    from transformers import AutoTokenizer

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--nextchat-tests--converted-tiny"
    shutil.copytree(converted["safetensors"], repo / "snapshots" / commit)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)

    input_ids, pixel_values, boxes, _ = _example_inputs()
    inputs = {"input_ids": input_ids, "pixel_values": pixel_values, "box_inputs": boxes[None]}
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "remote.py").write_text(_REMOTE_SCRIPT)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env.update(HF_HOME=str(tmp_path / "hf_home"), HF_HUB_CACHE=str(tmp_path / "hub"), HF_HUB_OFFLINE="1")
    result = subprocess.run(
        [sys.executable, "-I", str(tmp_path / "remote.py"), "nextchat-tests/converted-tiny",
         str(tmp_path / "inputs.pt"), str(tmp_path / "result.pt")],
        cwd="/", env=env, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    remote = torch.load(tmp_path / "result.pt")
    assert remote["class"].startswith("transformers_modules.")
    with torch.no_grad():
        local = model(**inputs)
    torch.testing.assert_close(remote["logits"], local.logits, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(remote["pred_boxes"], local.pred_boxes, atol=1e-6, rtol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(str(converted["safetensors"]))
    assert remote["ids"] == tokenizer("USER: <im_start><im_end> Where? ASSISTANT: Answer: <at> <boxes> .").input_ids


def test_converted_processor_feeds_the_converted_model(converted, model):
    from PIL import Image

    from nextchat.processing import NextChatProcessor

    processor = NextChatProcessor.from_pretrained(str(converted["safetensors"]))
    assert processor.image_seq_length == model.config.image_seq_length == 16
    assert processor.special_token_ids == {k: getattr(model.config, k) for k in processor.special_token_ids}
    image = Image.new("RGB", (80, 60), (200, 30, 30))
    inputs = processor(images=image, text="<image> Where is the thing [0]? ASSISTANT:", boxes=[[10, 5, 40, 50]],
                       return_tensors="pt")
    assert inputs["pixel_values"].shape == (1, 3, 56, 56)
    assert inputs["sam_pixel_values"].shape == (1, 3, 1024, 1024)
    assert int((inputs["input_ids"] == 128).sum()) == 16 and int((inputs["input_ids"] == 132).sum()) == 1
    inputs.pop("sam_pixel_values")  # SAM is covered by the parity test; keep this one fast
    inputs.pop("image_sizes", None)
    with torch.no_grad():
        out = model(**inputs)
    assert out.pred_boxes.shape == (1, 4) and torch.isfinite(out.logits).all()


def test_converted_folder_loads_with_auto_processor(converted):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(str(converted["safetensors"]), trust_remote_code=True)
    assert type(processor).__name__ == "NextChatProcessor"
