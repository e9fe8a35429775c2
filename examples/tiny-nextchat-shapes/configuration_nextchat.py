"""NExT-Chat model configuration."""

from dataclasses import field
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import AutoConfig
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.utils import logging


logger = logging.get_logger(__name__)


# Sizes of SAM ViT-H, spelled as segment-anything's own builder spells them (`build_sam_vit_h`).
SAM_VIT_H_CONFIG = {
    "image_size": 1024,
    "patch_size": 16,
    "encoder_embed_dim": 1280,
    "encoder_depth": 32,
    "encoder_num_heads": 16,
    "encoder_global_attn_indexes": [7, 15, 23, 31],
    "window_size": 14,
    "prompt_embed_dim": 256,
}

# CLIP ViT-L/14 at 336 pixels, the vision tower of the published model.
CLIP_VIT_L_336_CONFIG = {
    "hidden_size": 1024,
    "intermediate_size": 4096,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "image_size": 336,
    "patch_size": 14,
    "projection_dim": 768,
    "hidden_act": "quick_gelu",
}

# Vicuna-7B v1.5 (LLaMA-2 7B) with the five added tokens of NExT-Chat.
VICUNA_7B_CONFIG = {
    "vocab_size": 32005,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 32,
    "max_position_embeddings": 4096,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}

# The five tokens NExT-Chat adds to the LLaMA vocabulary, in the order the original adds them, each with the
# config field that holds its id and the processor attribute that holds its string. The one place they are named.
NEXTCHAT_SPECIAL_TOKENS = {
    "image_token_id": "<im_patch>",
    "image_start_token_id": "<im_start>",
    "image_end_token_id": "<im_end>",
    "trigger_token_id": "<at>",
    "box_token_id": "<boxes>",
}

# Fields older versions kept in the config: training arguments (loss weights, now `NextChatLossWeights`; the
# attention terms, now `nextchat.training.AttentionSupervision`; SAM's training box prompt, now the model's
# `sam_box_prompt` attribute) and an experimental input (`box_region_features`, never enabled in a released
# model). Old `config.json` files carry them: they load, and the fields are dropped.
LEGACY_TRAINING_FIELDS = (
    "lm_loss_weight", "box_l1_loss_weight", "box_giou_loss_weight", "cycle_embed_loss_weight", "cycle_box_loss_weight",
    "grounding_attention_loss_weight", "region_attention_loss_weight", "mask_ce_loss_weight", "mask_dice_loss_weight",
    "mask_iou_loss_weight", "grounding_attention_layers", "grounding_attention_heads", "region_attention_heads",
    "attention_loss_per_head", "box_region_features", "sam_box_prompt",
)

_MASK_LOSS_TYPES = ("focal", "bce")
_BOX_DECODER_ACTIVATIONS = (None, "sigmoid")


def _default_sam_config():
    return dict(SAM_VIT_H_CONFIG)


@strict
class NextChatConfig(PreTrainedConfig):
    r"""
    Configuration of a NExT-Chat model: a LLaMA language model, a CLIP vision tower, a projector between
    them, the box encoder/decoder MLPs of pix2emb, and optionally SAM for masks. The defaults give the
    published `AoZhang/nextchat-7b-336` model (Vicuna-7B v1.5, CLIP ViT-L/14-336, SAM ViT-H).

    Args:
        text_config (`dict` or `LlamaConfig`, *optional*):
            Configuration of the language model (any `AutoModel`-buildable decoder, LLaMA by default).
        vision_config (`dict` or `CLIPVisionConfig`, *optional*):
            Configuration of the vision tower.
        sam_config (`dict` or `None`, *optional*, defaults to SAM ViT-H):
            Sizes of SAM with segment-anything's builder names (`image_size`, `patch_size`,
            `encoder_embed_dim`, `encoder_depth`, `encoder_num_heads`, `encoder_global_attn_indexes`,
            `window_size`, `prompt_embed_dim`); the mask decoder keeps SAM's standard sizes. `None` builds a
            box-only model without SAM.
        vision_feature_layer (`int`, *optional*, defaults to -2):
            Hidden-state index of the vision tower whose patch features (CLS dropped) feed the projector.
        projector_depth (`int`, *optional*, defaults to 2):
            Number of linear layers of the projector (GELU between them), as `mm_depth` of the original.
        num_seg_prompt_tokens (`int`, *optional*, defaults to 4):
            Number of SAM sparse prompt tokens produced from a trigger hidden state by `seg_prompt_mlp`.
        image_token_id, image_start_token_id, image_end_token_id, trigger_token_id, box_token_id (`int`):
            Ids of `<im_patch>`, `<im_start>`, `<im_end>`, `<at>` and `<boxes>`; always take them from the
            checkpoint's tokenizer.
        box_decoder_activation (`str` or `None`, *optional*, defaults to `None`):
            `None` keeps the original's unbounded `loc_decoder` output (parity with converted checkpoints);
            `"sigmoid"` squashes boxes into [0, 1], which helps models trained from scratch.
        mask_loss_type (`str`, *optional*, defaults to `"focal"`):
            `"focal"`: the original's focal term on the per-mask mean BCE; `"bce"`: plain per-pixel BCE.
        mask_focal_alpha, mask_focal_gamma, mask_dice_smooth (`float`): the intended constants of the
            original SAM loss (0.8, 2 and 1; the original passed the mask count in place of alpha and of the
            dice smoothing by mistake).

    The weights of the loss terms and the box SAM is prompted with in training are training arguments, not
    configuration: `model.loss_weights` (`NextChatLossWeights`) and `model.sam_box_prompt`. Fields that older
    versions saved here (`LEGACY_TRAINING_FIELDS`) are dropped on load.
    Validation follows transformers' `@strict` configs: field types at construction, and the `validate_*` methods
    below at construction and at `save_pretrained`.
    """

    model_type = "nextchat"
    sub_configs_defaults = {
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama", init_kwargs=VICUNA_7B_CONFIG),
        "vision_config": SubConfigSpec(
            config_class=AutoConfig, model_type="clip_vision_model", init_kwargs=CLIP_VIT_L_336_CONFIG
        ),
    }

    text_config: dict | PreTrainedConfig | None = None
    vision_config: dict | PreTrainedConfig | None = None
    sam_config: dict | None = field(default_factory=_default_sam_config)

    vision_feature_layer: int = -2
    projector_depth: int = 2
    num_seg_prompt_tokens: int = 4

    image_token_id: int = 32000
    image_start_token_id: int = 32001
    image_end_token_id: int = 32002
    trigger_token_id: int = 32003
    box_token_id: int = 32004

    box_decoder_activation: str | None = None

    mask_loss_type: str = "focal"
    mask_focal_alpha: float = 0.8
    mask_focal_gamma: float = 2.0
    mask_dice_smooth: float = 1.0

    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        dropped = sorted(name for name in LEGACY_TRAINING_FIELDS if kwargs.pop(name, None) is not None)
        if dropped:
            logger.info(f"NextChatConfig: ignoring {dropped}, training arguments that older versions kept in the config")
        if self.sam_config is not None:
            unknown = set(self.sam_config) - set(SAM_VIT_H_CONFIG)
            if unknown:
                raise ValueError(
                    f"`sam_config` has unknown keys {sorted(unknown)}; expected a subset of {sorted(SAM_VIT_H_CONFIG)}"
                )
            self.sam_config = {**SAM_VIT_H_CONFIG, **self.sam_config}
            self.sam_config["encoder_global_attn_indexes"] = list(self.sam_config["encoder_global_attn_indexes"])
        super().__post_init__(**kwargs)

    @property
    def image_seq_length(self) -> int:
        """Number of `<im_patch>` placeholders per image: one per vision patch, CLS dropped."""
        return (self.vision_config.image_size // self.vision_config.patch_size) ** 2

    @property
    def special_token_ids(self) -> dict[str, int]:
        """The id of each of the five NExT-Chat tokens, keyed by its config field (`NEXTCHAT_SPECIAL_TOKENS`)."""
        return {name: getattr(self, name) for name in NEXTCHAT_SPECIAL_TOKENS}

    def validate_token_ids(self):
        """Part of `@strict`-powered validation: the five NExT-Chat token ids are distinct ids of the vocabulary."""
        super().validate_token_ids()
        vocab_size = self.text_config.vocab_size
        ids = self.special_token_ids
        for name, token_id in ids.items():
            if not isinstance(token_id, int) or not 0 <= token_id < vocab_size:
                raise ValueError(
                    f"`{name}`={token_id!r} is outside the vocabulary of `text_config` (vocab_size={vocab_size}); "
                    "take the ids from the checkpoint's tokenizer"
                )
        if len(set(ids.values())) != len(ids):
            raise ValueError(f"the five NExT-Chat token ids must be distinct, got {ids}")

    def validate_architecture(self):
        """Part of `@strict`-powered validation: the sizes describe a model that can be built."""
        if self.projector_depth < 1:
            raise ValueError(f"`projector_depth` must be >= 1, got {self.projector_depth!r}")
        num_layers = self.vision_config.num_hidden_layers
        if not -(num_layers + 1) <= self.vision_feature_layer <= num_layers:
            raise ValueError(
                f"`vision_feature_layer`={self.vision_feature_layer} does not exist in a vision tower with "
                f"{num_layers} layers (valid: {-(num_layers + 1)}..{num_layers})"
            )
        if self.vision_config.image_size % self.vision_config.patch_size:
            raise ValueError(
                f"`vision_config.image_size`={self.vision_config.image_size} is not a multiple of "
                f"`vision_config.patch_size`={self.vision_config.patch_size}"
            )
        if self.text_config.hidden_size < 2:
            raise ValueError("`text_config.hidden_size` must be at least 2 (the box MLPs use hidden_size // 2)")
        if self.num_seg_prompt_tokens < 1:
            raise ValueError(f"`num_seg_prompt_tokens` must be >= 1, got {self.num_seg_prompt_tokens}")
        if self.sam_config is not None:
            self._check_sam_config(self.sam_config)

    def validate_options(self):
        """Part of `@strict`-powered validation: the options hold one of their values."""
        if self.box_decoder_activation not in _BOX_DECODER_ACTIVATIONS:
            raise ValueError(
                f"`box_decoder_activation` must be one of {_BOX_DECODER_ACTIVATIONS}, got {self.box_decoder_activation!r}"
            )
        if self.mask_loss_type not in _MASK_LOSS_TYPES:
            raise ValueError(f"`mask_loss_type` must be one of {_MASK_LOSS_TYPES}, got {self.mask_loss_type!r}")

    @staticmethod
    def _check_sam_config(sam: dict[str, Any]):
        if sam["image_size"] % sam["patch_size"]:
            raise ValueError(
                f"`sam_config['image_size']`={sam['image_size']} is not a multiple of "
                f"`sam_config['patch_size']`={sam['patch_size']}"
            )
        if sam["encoder_embed_dim"] % sam["encoder_num_heads"]:
            raise ValueError(
                f"`sam_config['encoder_embed_dim']`={sam['encoder_embed_dim']} is not divisible by "
                f"`sam_config['encoder_num_heads']`={sam['encoder_num_heads']}"
            )
        bad = [i for i in sam["encoder_global_attn_indexes"] if not 0 <= i < sam["encoder_depth"]]
        if bad:
            raise ValueError(
                f"`sam_config['encoder_global_attn_indexes']` has blocks {bad} outside "
                f"0..{sam['encoder_depth'] - 1} (`encoder_depth`={sam['encoder_depth']})"
            )
        if sam["prompt_embed_dim"] % 8:
            raise ValueError(
                f"`sam_config['prompt_embed_dim']`={sam['prompt_embed_dim']} must be divisible by 8 "
                "(the heads of SAM's mask decoder)"
            )


__all__ = ["LEGACY_TRAINING_FIELDS", "NEXTCHAT_SPECIAL_TOKENS", "NextChatConfig", "SAM_VIT_H_CONFIG"]
