"""transformers' OWN common tests run against NExT-Chat, plugged in as transformers' LLaVA tests plug into them.

The mixins (`ModelTesterMixin`, `ConfigTester`, `ProcessorTesterMixin`) come from the sdist of the installed
transformers version, downloaded with pip at test time and cached outside the repository (see
`transformers_common_support.py`); the whole module is skipped, saying why, when they cannot be had.

Tests that fail because of a deliberate, documented design choice of NExT-Chat are listed, each with its reason, in
`transformers_common_deselected.txt` and skipped with that reason. A few more are skipped because the sdist lacks the
upstream file they need (`UNAVAILABLE` below). Everything else runs.
"""

import copy
import fnmatch
import os
import unittest
import unittest.mock

import pytest
import torch

from transformers_common_support import STAND_INS, CommonTestsUnavailable, load_common_tests


try:
    test_modeling_common, test_configuration_common, test_processing_common = load_common_tests()
except CommonTestsUnavailable as error:
    pytest.skip(f"transformers' common tests are unavailable: {error}", allow_module_level=True)

from nextchat import NextChatConfig, NextChatForConditionalGeneration, NextChatModel, NextChatProcessor  # noqa: E402
from nextchat.processing import NextChatImageProcessor  # noqa: E402
from tiny_models import tiny_tokenizer  # noqa: E402


ModelTesterMixin = test_modeling_common.ModelTesterMixin
floats_tensor = test_modeling_common.floats_tensor
ids_tensor = test_modeling_common.ids_tensor
ConfigTester = test_configuration_common.ConfigTester
ProcessorTesterMixin = test_processing_common.ProcessorTesterMixin

HERE = os.path.dirname(os.path.abspath(__file__))
DESELECTED_FILE = os.path.join(HERE, "transformers_common_deselected.txt")

# Tests that cannot run because the transformers sdist lacks an upstream file they need (our stand-in replaces it).
UNAVAILABLE = {}
if "tests/generation/test_utils.py" in STAND_INS:
    UNAVAILABLE["test_generation_tester_mixin_inheritance"] = (
        "transformers' GenerationTesterMixin (tests/generation/test_utils.py) is not shipped in the transformers sdist, "
        "so the model tests cannot inherit it; NExT-Chat's generation is tested in tests/test_generation.py"
    )


# -- tiny sizes ---------------------------------------------------------------------------------------------------

VOCAB_SIZE = 99
PAD, BOS, EOS = 0, 1, 2
IMAGE, IMAGE_START, IMAGE_END, TRIGGER, BOXES = 3, 4, 5, 6, 7  # low ids: they survive vocabulary shrinking
FIRST_TEXT_ID = 8


class NextChatModelTester:
    """Tiny NExT-Chat configs and inputs: `[<im_start>, <im_patch> x N, <im_end>, text...]` per row; with `boxes`,
    row b also holds (b % 2) + 1 `<at> <boxes>` pairs with their `box_inputs`/`box_inputs_mask`; with `sam`, a tiny SAM
    and `sam_pixel_values`."""

    # batch 7: the eager/SDPA tests run batches of 7 and pad smaller ones with random rows, whose random image and box
    # tokens would not match the images and boxes given
    def __init__(self, parent, boxes=False, sam=False, batch_size=7, text_length=9, is_training=True):
        self.parent = parent
        self.boxes = boxes
        self.sam = sam
        self.batch_size = batch_size
        self.is_training = is_training
        self.text_config = {
            "model_type": "llama",
            "vocab_size": VOCAB_SIZE,
            "hidden_size": 32,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "hidden_act": "silu",
            "max_position_embeddings": 512,
            "initializer_range": 0.02,
            "pad_token_id": PAD,
            "bos_token_id": BOS,
            "eos_token_id": EOS,
        }
        self.vision_config = {
            "image_size": 8,
            "patch_size": 4,
            "num_channels": 3,
            "hidden_size": 16,
            "projection_dim": 16,
            "intermediate_size": 37,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "initializer_range": 0.02,
        }
        self.sam_config = (
            {
                "image_size": 32,
                "patch_size": 16,
                "encoder_embed_dim": 16,
                "encoder_depth": 2,
                "encoder_num_heads": 2,
                "encoder_global_attn_indexes": [1],
                "window_size": 2,
                "prompt_embed_dim": 16,
            }
            if sam
            else None
        )
        self.vocab_size = VOCAB_SIZE
        self.hidden_size = self.text_config["hidden_size"]
        self.num_hidden_layers = self.text_config["num_hidden_layers"]
        self.num_attention_heads = self.text_config["num_attention_heads"]
        self.pad_token_id = PAD
        self.num_image_tokens = (self.vision_config["image_size"] // self.vision_config["patch_size"]) ** 2
        self.seq_length = self.num_image_tokens + 2 + text_length
        self.encoder_seq_length = self.seq_length
        self.max_boxes = 2 if boxes else 0

    def get_config(self):
        return NextChatConfig(
            text_config=copy.deepcopy(self.text_config),
            vision_config=copy.deepcopy(self.vision_config),
            sam_config=copy.deepcopy(self.sam_config),
            image_token_id=IMAGE,
            image_start_token_id=IMAGE_START,
            image_end_token_id=IMAGE_END,
            trigger_token_id=TRIGGER,
            box_token_id=BOXES,
        )

    def prepare_config_and_inputs(self):
        size = self.vision_config["image_size"]
        pixel_values = floats_tensor([self.batch_size, 3, size, size])
        return self.get_config(), pixel_values

    def prepare_config_and_inputs_for_common(self):
        config, pixel_values = self.prepare_config_and_inputs()
        input_ids = ids_tensor([self.batch_size, self.seq_length], VOCAB_SIZE - FIRST_TEXT_ID) + FIRST_TEXT_ID
        input_ids[:, 0] = IMAGE_START
        input_ids[:, 1 : 1 + self.num_image_tokens] = IMAGE
        input_ids[:, 1 + self.num_image_tokens] = IMAGE_END
        inputs_dict = {
            "input_ids": input_ids,
            "attention_mask": torch.ones_like(input_ids),
            "pixel_values": pixel_values,
        }
        if self.boxes:
            box_inputs = torch.zeros(self.batch_size, self.max_boxes, 4)
            box_inputs_mask = torch.zeros(self.batch_size, self.max_boxes, dtype=torch.bool)
            for row in range(self.batch_size):
                for k in range(row % 2 + 1):
                    # `<at> <boxes>` then text; never in the last two columns, which test_resize_tokens_embeddings
                    # overwrites
                    column = self.seq_length - 4 - 3 * k
                    input_ids[row, column] = TRIGGER
                    input_ids[row, column + 1] = BOXES
                corners = floats_tensor([self.max_boxes, 2, 2]).sort(dim=1).values  # x0 <= x1, y0 <= y1
                box_inputs[row] = corners.transpose(1, 2).reshape(self.max_boxes, 4)[:, [0, 2, 1, 3]]
                box_inputs_mask[row, : row % 2 + 1] = True
            inputs_dict["box_inputs"] = box_inputs
            inputs_dict["box_inputs_mask"] = box_inputs_mask
        if self.sam:
            size = self.sam_config["image_size"]
            inputs_dict["sam_pixel_values"] = floats_tensor([self.batch_size, 3, size, size])
        return config, inputs_dict


def _load_deselected(path=DESELECTED_FILE):
    """`[(pattern, reason)]` from the deselection file: `pattern  # reason` per line, where the pattern is a test
    name or `ClassName::test_name` (fnmatch globs allowed)."""
    entries = []
    if not os.path.exists(path):
        return entries
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            pattern, sep, reason = line.partition("#")
            if not sep or not reason.strip():
                raise ValueError(f"{path}:{number}: every deselection needs a reason after '#': {line.rstrip()!r}")
            entries.append((pattern.strip(), reason.strip()))
    return entries


DESELECTED = _load_deselected()


def _skip_listed(cls):
    """Class decorator: skips, with their reasons, the tests listed in the deselection file and in `UNAVAILABLE`."""
    for name in dir(cls):
        if not name.startswith("test_") or not callable(getattr(cls, name)):
            continue
        reason = UNAVAILABLE.get(name)
        for pattern, why in DESELECTED:
            if fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(f"{cls.__name__}::{name}", pattern):
                reason = f"deselected (tests/transformers_common_deselected.txt): {why}"
                break
        if reason is not None:
            setattr(cls, name, unittest.skip(reason)(getattr(cls, name)))
    return cls


class _NextChatModelTestBase(ModelTesterMixin):
    all_model_classes = (NextChatModel, NextChatForConditionalGeneration)
    _is_composite = True
    # the inputs besides `input_ids` that tests building their own batches (eager vs SDPA) must keep
    additional_model_inputs = ["pixel_values", "box_inputs", "box_inputs_mask", "sam_pixel_values"]
    # As the published model (and LLaVA), the projector reads the vision tower's hidden states at
    # `vision_feature_layer` (-2), so the last vision layer and CLIP's `post_layernorm` get no gradient; the weights stay
    # for checkpoint parity. transformers' own knob for such models (e.g. Ovis2.5): the gradient-checkpointing tests
    # then still compare gradients with and without checkpointing, without asking every parameter to get one.
    test_all_params_have_gradient = False
    # The mixin runs `test_can_init_all_missing_weights` only for models whose file header says 2023 or later (a
    # transformers backlog rule); run it.
    test_can_init_all_missing_weights_before_2023 = True
    tester_kwargs = {}

    def setUp(self):
        self.model_tester = NextChatModelTester(self, **self.tester_kwargs)
        # The mixin tells a base model (no head, no loss: skipped by the training tests, used by the inputs_embeds
        # and RoPE tests) and a decoder-only LM head (checked by the loss tests) by looking class names up in
        # transformers' own *_MAPPING_NAMES, which list in-library models only. For the duration of each test, list
        # NextChatModel and NextChatForConditionalGeneration there (as `nextchat` registers them with the Auto
        # classes), so that the mixin treats them as it treats LlavaModel and LlavaForConditionalGeneration.
        for names, class_name in (
            (test_modeling_common.MODEL_MAPPING_NAMES, "NextChatModel"),
            (test_modeling_common.MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES, "NextChatForConditionalGeneration"),
        ):
            patcher = unittest.mock.patch.dict(names, {"nextchat": class_name})
            patcher.start()
            self.addCleanup(patcher.stop)

    def _prepare_for_class(self, inputs_dict, model_class, return_labels=False):
        inputs_dict = super()._prepare_for_class(inputs_dict, model_class, return_labels=return_labels)
        if model_class is NextChatModel:
            inputs_dict.pop("sam_pixel_values", None)  # SAM belongs to the head model
        if return_labels and model_class is NextChatForConditionalGeneration:
            # Causal-LM targets as the processor writes them: image blocks and `<boxes>` ignored; a labelled `<at>`
            # is an answer trigger, trained against the box of the `<boxes>` after it.
            labels = inputs_dict["input_ids"].clone()
            labels[(labels == IMAGE) | (labels == IMAGE_START) | (labels == IMAGE_END) | (labels == BOXES)] = -100
            inputs_dict["labels"] = labels
        return inputs_dict


@_skip_listed
class NextChatModelTest(_NextChatModelTestBase, unittest.TestCase):
    """Box-only NExT-Chat (`sam_config=None`), image and text inputs."""

    tester_kwargs = {"boxes": False, "sam": False}


@_skip_listed
class NextChatWithBoxesModelTest(_NextChatModelTestBase, unittest.TestCase):
    """Box-only NExT-Chat with user boxes: `<at> <boxes>` pairs in `input_ids`, `box_inputs`, `box_inputs_mask`."""

    tester_kwargs = {"boxes": True, "sam": False}


@_skip_listed
class NextChatWithSamModelTest(_NextChatModelTestBase, unittest.TestCase):
    """NExT-Chat with a tiny SAM: triggers in `input_ids` and `sam_pixel_values`, so masks are predicted."""

    all_model_classes = (NextChatForConditionalGeneration,)
    tester_kwargs = {"boxes": True, "sam": True}


def _add_config_checks(cls):
    """One test per `ConfigTester` check besides `test_config`, so that a failure names its check."""
    for name in dir(ConfigTester):
        if name.startswith(("create_and_test_", "check_")):
            def test(self, _name=name):
                getattr(self.config_tester, _name)()

            test.__name__ = f"test_{name}"
            setattr(cls, test.__name__, test)
    return cls


@_skip_listed
@_add_config_checks
class NextChatConfigTest(unittest.TestCase):
    def setUp(self):
        # as in LLaVA's tests, the tester's tiny config serves `create_and_test_config_from_pretrained_custom_kwargs`
        self.model_tester = NextChatModelTester(self, boxes=True, sam=True)
        # Scalar fields only: `create_and_test_config_to_json_string` compares every given value with its JSON,
        # which a partial sub-config dict would not match. `sam_config=None` checks the box-only variant's round trip;
        # the defaults (the published 7B model, SAM included) are checked by `check_config_can_be_init_without_params`.
        self.config_tester = ConfigTester(
            self,
            config_class=NextChatConfig,
            has_text_modality=False,
            common_properties=["image_token_id", "trigger_token_id", "box_token_id", "vision_feature_layer"],
            sam_config=None,
            image_token_id=IMAGE,
            image_start_token_id=IMAGE_START,
            image_end_token_id=IMAGE_END,
            trigger_token_id=TRIGGER,
            box_token_id=BOXES,
        )

    def test_config(self):
        """transformers' entry point, as LLaVA's tests call it."""
        self.config_tester.run_common_tests()


@_skip_listed
class NextChatProcessorTest(ProcessorTesterMixin, unittest.TestCase):
    processor_class = NextChatProcessor

    @classmethod
    def _setup_tokenizer(cls):
        return tiny_tokenizer()

    @classmethod
    def _setup_image_processor(cls):
        return NextChatImageProcessor(
            size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28}, sam_image_size=64
        )

    @staticmethod
    def prepare_processor_dict():
        return {"image_seq_length": 4}

    @classmethod
    def _setup_test_attributes(cls, processor):
        # The mixin writes `cls.image_token` into its texts where an image goes. In LLaVA that token is both the text
        # placeholder and the expanded token; NExT-Chat's text placeholder is `image_placeholder` ("<image>"), which
        # the processor expands to `<im_start> <im_patch> x N <im_end>`, while `processor.image_token` is `<im_patch>`,
        # which typed into a text is escaped, never obeyed (DESIGN: control tokens typed in the text are escaped).
        super()._setup_test_attributes(processor)
        cls.image_token = processor.image_placeholder
