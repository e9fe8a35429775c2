"""PyTorch NExT-Chat (pix2emb): a LLaVA-style chat model whose locations are embeddings.

The last-layer hidden state at every trigger token `<at>` is decoded by `loc_decoder` into a normalised xyxy box
(and, through `seg_prompt_mlp` and SAM, into a mask); the position after it, `<boxes>`, is fed `loc_encoder(box)`.
"""

import importlib
import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin, PreTrainedModel
from transformers.cache_utils import Cache
from transformers.modeling_outputs import BaseModelOutputWithPast, BaseModelOutputWithPooling
from transformers import initialization as init
from transformers.processing_utils import Unpack
from transformers.utils import ModelOutput, TransformersKwargs, can_return_tuple
from transformers.utils.deprecation import deprecate_kwarg

from .configuration.configuration_nextchat import NextChatConfig
from .generation_nextchat import NextChatGenerationMixin, TriggerState
from .loss_nextchat import box_losses, box_patch_targets, mask_losses, per_query_attention_loss


IGNORE_INDEX = -100
REGION_GRID = 7  # with `box_region_features`: a box's feature averages REGION_GRID x REGION_GRID bilinear samples


# Keyword arguments that travel from `forward` to the language model (transformers' own per-call options).
LANGUAGE_MODEL_KWARGS = frozenset(TransformersKwargs.__annotations__)


def _check_kwargs(kwargs: dict, allowed: frozenset, method: str):
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise TypeError(
            f"{method}() got unexpected keyword argument(s) {unknown}; besides its named arguments it accepts "
            f"transformers' per-call options {sorted(allowed)}"
        )


def _dtype_of(module: nn.Module) -> torch.dtype:
    # not `module[0].weight`: PEFT's `modules_to_save` wraps the head in a module that cannot be indexed
    return next(module.parameters()).dtype


def _mlp(in_features: int, hidden_features: int, out_features: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_features, hidden_features), nn.ReLU(), nn.Linear(hidden_features, out_features))


def region_features(image_features: torch.Tensor, boxes: torch.Tensor, grid: int = REGION_GRID) -> torch.Tensor:
    """Mean of the image features sampled bilinearly at the centres of a `grid` x `grid` partition of each box.

    Args:
        image_features: `(K, N, hidden)` patch features (N = side², row-major) of the image each box belongs to.
        boxes: `(K, 4)` normalised xyxy boxes in the frame the vision tower sees (the padded square); clamped into
            the image, corners in either order.

    Returns:
        `(K, hidden)` features.
    """
    num, length, hidden = image_features.shape
    side = math.isqrt(length)
    maps = image_features.transpose(1, 2).reshape(num, hidden, side, side).float()
    boxes = boxes.float().clamp(0, 1)
    low, high = torch.minimum(boxes[:, :2], boxes[:, 2:]), torch.maximum(boxes[:, :2], boxes[:, 2:])
    steps = (torch.arange(grid, device=boxes.device, dtype=boxes.dtype) + 0.5) / grid
    points = low[:, None, :] + steps[None, :, None] * (high - low)[:, None, :]  # (K, grid, 2): x and y per step
    xs, ys = points[..., 0], points[..., 1]
    sample_grid = torch.stack(torch.broadcast_tensors(xs[:, None, :], ys[:, :, None]), dim=-1)  # (K, grid, grid, 2)
    sampled = nn.functional.grid_sample(maps, sample_grid * 2 - 1, mode="bilinear", padding_mode="border",
                                        align_corners=False)
    return sampled.mean(dim=(2, 3)).to(image_features.dtype)


LOSS_WEIGHT_NAMES = (
    "lm_loss_weight", "box_l1_loss_weight", "box_giou_loss_weight", "cycle_embed_loss_weight", "cycle_box_loss_weight",
    "grounding_attention_loss_weight", "region_attention_loss_weight", "mask_ce_loss_weight", "mask_dice_loss_weight",
    "mask_iou_loss_weight",
)


@dataclass
class NextChatLossWeights:
    """The weights of the loss terms: training arguments, not model configuration.

    Set them on a model as ``model.loss_weights = NextChatLossWeights(...)`` (the stage presets of
    `nextchat.training` always do): a model attribute, never written to ``config.json``, so a checkpoint never hands
    the weights of its last training phase to the next one. The defaults are the original NExT-Chat's: LM 1,
    box L1 2, GIoU 0.2, both cycle losses 1, mask focal/BCE 20, dice 1, IoU head 1 (the attention terms, not in the
    original, 0). While ``model.loss_weights`` is None, ``forward`` falls back to the ``*_loss_weight`` fields of the
    config (what older versions did; old ``config.json`` files that carry them load unchanged).
    """

    lm_loss_weight: float = 1.0
    box_l1_loss_weight: float = 2.0
    box_giou_loss_weight: float = 0.2
    cycle_embed_loss_weight: float = 1.0
    cycle_box_loss_weight: float = 1.0
    grounding_attention_loss_weight: float = 0.0
    region_attention_loss_weight: float = 0.0
    mask_ce_loss_weight: float = 20.0
    mask_dice_loss_weight: float = 1.0
    mask_iou_loss_weight: float = 1.0

    @classmethod
    def from_config(cls, config) -> "NextChatLossWeights":
        """The weights a config carries (the legacy place), defaults where it has none."""
        return cls(**{name: getattr(config, name) for name in LOSS_WEIGHT_NAMES if hasattr(config, name)})

    def to_dict(self) -> dict:
        return {name: getattr(self, name) for name in LOSS_WEIGHT_NAMES}


def _build_projector(depth: int, in_features: int, out_features: int) -> nn.Sequential:
    """The original `mm_projector`: Linear, then (depth−1) × [GELU, Linear]; indices 0, 2, 4… hold the weights."""
    layers = [nn.Linear(in_features, out_features)]
    for _ in range(depth - 1):
        layers += [nn.GELU(), nn.Linear(out_features, out_features)]
    return nn.Sequential(*layers)


@dataclass
class NextChatModelOutputWithPast(BaseModelOutputWithPast):
    """
    `BaseModelOutputWithPast` of the language model, plus:

    Args:
        image_outputs (`BaseModelOutputWithPooling`, *optional*): `get_image_features` of the images, when
            `pixel_values` were given (`pooler_output`: one `(image_seq_length, hidden_size)` tensor per image).
    """

    image_outputs: BaseModelOutputWithPooling | None = None


@dataclass
class NextChatCausalLMOutputWithPast(ModelOutput):
    """
    Args:
        loss (`torch.FloatTensor` of shape `()`): weighted sum of the terms below that apply.
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`).
        cache (`Cache`): the key/value cache (also readable as `past_key_values`, transformers' older name).
        hidden_states, attentions: as returned by the language model when asked for.
        image_outputs (`BaseModelOutputWithPooling`): `get_image_features` of the images, when `pixel_values` were
            given (as LLaVA returns them).
        trigger_positions (`torch.LongTensor` of shape `(K, 2)`): `(row, column)` of every `<at>` in `input_ids`
            as given (padding included), row-major.
        pred_boxes (`torch.FloatTensor` of shape `(K, 4)`): `loc_decoder` of the hidden state at each trigger,
            normalised xyxy in the padded-square frame.
        pred_masks (`torch.FloatTensor` of shape `(K, h, w)`): SAM low-resolution mask logits over the padded SAM
            input, when `sam_pixel_values` was given.
        iou_scores (`torch.FloatTensor` of shape `(K,)`): SAM's predicted IoU of each mask.
        lm_loss, box_l1_loss, box_giou_loss, cycle_embed_loss, cycle_box_loss, mask_ce_loss, mask_dice_loss,
        mask_iou_loss, grounding_attention_loss, region_attention_loss: the unweighted loss terms (each normalised
            by its own item count).
    """

    loss: torch.FloatTensor | None = None
    logits: torch.FloatTensor | None = None
    cache: Cache | None = None
    hidden_states: tuple[torch.FloatTensor, ...] | None = None
    attentions: tuple[torch.FloatTensor, ...] | None = None
    image_outputs: BaseModelOutputWithPooling | None = None
    trigger_positions: torch.LongTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    pred_masks: torch.FloatTensor | None = None
    iou_scores: torch.FloatTensor | None = None
    lm_loss: torch.FloatTensor | None = None
    box_l1_loss: torch.FloatTensor | None = None
    box_giou_loss: torch.FloatTensor | None = None
    cycle_embed_loss: torch.FloatTensor | None = None
    cycle_box_loss: torch.FloatTensor | None = None
    mask_ce_loss: torch.FloatTensor | None = None
    mask_dice_loss: torch.FloatTensor | None = None
    mask_iou_loss: torch.FloatTensor | None = None
    grounding_attention_loss: torch.FloatTensor | None = None
    region_attention_loss: torch.FloatTensor | None = None


MODEL_AUTO_MAP = {
    "AutoConfig": "configuration_nextchat.NextChatConfig",
    "AutoModel": "modeling_nextchat.NextChatForConditionalGeneration",
    "AutoModelForCausalLM": "modeling_nextchat.NextChatForConditionalGeneration",
    "AutoModelForImageTextToText": "modeling_nextchat.NextChatForConditionalGeneration",
}


class NextChatPreTrainedModel(PreTrainedModel):
    config: NextChatConfig
    config_class = NextChatConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _no_split_modules = ["LlamaDecoderLayer", "CLIPEncoderLayer", "Block", "MaskDecoder"]
    _skip_keys_device_placement = ["cache", "past_key_values"]
    _supports_flash_attn = True
    _supports_sdpa = True
    _supports_flex_attn = True
    _supports_attention_backend = True
    _can_compile_fullgraph = False

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, plus the flat remote code so that the folder loads with
        `trust_remote_code=True` where `nextchat` is not installed, and the grounding pipeline in `custom_pipelines`
        (`pipeline("grounded-image-text-to-text", model=folder, trust_remote_code=True)`)."""
        from .pipeline_nextchat import CUSTOM_PIPELINES  # also makes transformers ship the pipeline's file

        self.config.auto_map = {**(getattr(self.config, "auto_map", None) or {}), **MODEL_AUTO_MAP}
        self.config.custom_pipelines = {**(getattr(self.config, "custom_pipelines", None) or {}), **CUSTOM_PIPELINES}
        super().save_pretrained(save_directory, *args, **kwargs)
        if __name__.startswith("nextchat."):
            # From the installed package: export the code flat. Code loaded from the Hub is already flat, and
            # transformers copies it itself (`custom_object_save`).
            importlib.import_module("nextchat.remote_code").write_remote_code(save_directory)

    def _init_weights(self, module):
        super()._init_weights(module)
        # SAM parameters that are not Linear/Conv/Embedding/LayerNorm weights: start as segment-anything does.
        # (transformers.initialization, so that parameters loaded from a checkpoint are never drawn again)
        if hasattr(module, "pos_embed") and isinstance(module.pos_embed, nn.Parameter):
            init.zeros_(module.pos_embed)
        if hasattr(module, "rel_pos_h"):
            init.zeros_(module.rel_pos_h)
            init.zeros_(module.rel_pos_w)
        if hasattr(module, "positional_encoding_gaussian_matrix"):
            init.normal_(module.positional_encoding_gaussian_matrix)

    @classmethod
    def is_custom_code(cls) -> bool:
        """False: `_init_weights` initialises through `transformers.initialization`, as transformers' own models do,
        so transformers may initialise every missing weight the way its own model classes would (for remote or
        installed code, transformers would otherwise skip the CLIP attention and MLP blocks)."""
        return False


class NextChatModel(NextChatPreTrainedModel):
    """Vision tower + projector + language model, with image features and box embeddings merged into the inputs."""

    def __init__(self, config: NextChatConfig):
        super().__init__(config)
        hidden_size = config.text_config.hidden_size
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.mm_projector = _build_projector(config.projector_depth, config.vision_config.hidden_size, hidden_size)
        self.language_model = AutoModel.from_config(config.text_config)
        self.loc_encoder = _mlp(4, hidden_size // 2, hidden_size)
        self.post_init()

    def get_input_embeddings(self):
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.language_model.set_input_embeddings(value)

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> BaseModelOutputWithPooling:
        """The vision tower's output with `pooler_output` replaced by the projected features, as in LLaVA.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, H, W)`): CLIP inputs.
            vision_feature_layer (`int` or `list[int]`, *optional*): hidden-state layer(s) to project (several are
                concatenated, which needs a projector of that width); default `config.vision_feature_layer`.
            vision_feature_select_strategy (`str`, *optional*): `"default"` drops the CLS token (NExT-Chat), `"full"`
                keeps it.

        Returns:
            `BaseModelOutputWithPooling` whose `pooler_output` is a list of `num_images` tensors
            `(image_seq_length, hidden_size)`.
        """
        layer = self.config.vision_feature_layer if vision_feature_layer is None else vision_feature_layer
        strategy = vision_feature_select_strategy or "default"
        if strategy not in ("default", "full"):
            raise ValueError(f"`vision_feature_select_strategy` must be 'default' or 'full', got {strategy!r}")
        layers = [layer] if isinstance(layer, int) else list(layer)
        if not kwargs.get("output_hidden_states"):
            kwargs["output_hidden_states"] = layers  # capture only the layers used, unless all were asked for
        kwargs.pop("return_dict", None)
        outputs = self.vision_tower(pixel_values.to(self.vision_tower.dtype), return_dict=True, **kwargs)
        selected = [outputs.hidden_states[i] for i in layers]
        if strategy == "default":
            selected = [hidden[:, 1:] for hidden in selected]
        outputs.pooler_output = list(self.mm_projector(torch.cat(selected, dim=-1)))
        return outputs

    def _merge_image_features(self, input_ids, inputs_embeds, pixel_values, output_attentions=None):
        """Puts the projected patch features at the `<im_patch>` slots; also returns them, `(num_images, N, hidden)`,
        and `get_image_features`' output (both `None` without `pixel_values`)."""
        image_mask = input_ids == self.config.image_token_id
        per_image = self.config.image_seq_length
        if pixel_values is None:
            if bool(image_mask.any()):
                num_tokens = int(image_mask.sum())
                raise ValueError(
                    f"`input_ids` hold {num_tokens} image placeholders (`<im_patch>`, id {self.config.image_token_id}) "
                    "but no `pixel_values` were given"
                )
            return inputs_embeds, None, None
        if pixel_values.dim() != 4:
            raise ValueError(f"`pixel_values` must have shape (num_images, 3, H, W), got {tuple(pixel_values.shape)}")
        num_tokens = int(image_mask.sum())
        num_images = pixel_values.shape[0]
        per_row = image_mask.sum(dim=1)
        if num_tokens != num_images * per_image or bool((per_row % per_image).any()):
            raise ValueError(
                f"`pixel_values` holds {num_images} images of {per_image} features each, but the rows of `input_ids` "
                f"hold {per_row.tolist()} image placeholders; every image block needs exactly {per_image} `<im_patch>` "
                "tokens and one image"
            )
        kwargs = {} if output_attentions is None else {"output_attentions": output_attentions}
        image_outputs = self.get_image_features(pixel_values, return_dict=True, **kwargs)
        features = torch.stack(image_outputs.pooler_output).to(inputs_embeds.dtype)
        flat = features.reshape(-1, features.shape[-1])
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), flat), features, image_outputs

    def _image_block_of(self, input_ids: torch.LongTensor) -> torch.LongTensor:
        """`(B, T)` index (row-major over the batch) of the last image block that ends at or before each position;
        -1 where the position's row has none before it."""
        blocks = (input_ids == self.config.image_token_id).long().cumsum(1) // self.config.image_seq_length
        blocks_in_earlier_rows = blocks[:, -1].cumsum(0) - blocks[:, -1]
        return torch.where(blocks > 0, blocks_in_earlier_rows[:, None] + blocks - 1, -1)

    def _merge_box_embeddings(self, input_ids, box_token_mask, inputs_embeds, box_inputs, box_inputs_mask,
                              image_features, region_box_mask):
        per_row = box_token_mask.sum(dim=1)
        if box_inputs is None:
            if bool(per_row.any()):
                raise ValueError(
                    f"`input_ids` hold {per_row.tolist()} `<boxes>` tokens per row but no `box_inputs` were given"
                )
            return inputs_embeds
        boxes = _select_boxes(box_inputs, box_inputs_mask, per_row)
        if boxes.shape[0] == 0:
            return inputs_embeds
        box_embeds = self.loc_encoder(boxes.to(_dtype_of(self.loc_encoder)))
        if self.config.box_region_features and image_features is not None:
            image_index = self._image_block_of(input_ids)
            if region_box_mask is not None:
                image_index = image_index.masked_fill(~region_box_mask.to(image_index.device), -1)
            image_index = image_index[box_token_mask]
            has_image = (image_index >= 0)[:, None]
            # a read-out of the features, without gradient: the projector learns from the image tokens alone
            pooled = region_features(image_features[image_index.clamp(min=0)].detach(), boxes)
            box_embeds = box_embeds + pooled.to(box_embeds.dtype) * has_image.to(box_embeds.dtype)
        return inputs_embeds.masked_scatter(box_token_mask.unsqueeze(-1), box_embeds.to(inputs_embeds.dtype))

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache", raise_if_both_names=True)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        pixel_values: torch.FloatTensor | None = None,
        box_inputs: torch.FloatTensor | None = None,
        box_inputs_mask: torch.BoolTensor | None = None,
        region_box_mask: torch.BoolTensor | None = None,
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> NextChatModelOutputWithPast:
        """Embeds `input_ids` (image features at `<im_patch>`, `loc_encoder(box)` at `<boxes>`) and runs the LM.

        `input_ids` are required: the positions of the NExT-Chat tokens are read from them. With
        `config.box_region_features`, `region_box_mask` (`(batch_size, sequence_length)` bool) says which `<boxes>`
        also get their region's image features; default: every `<boxes>` given in `box_inputs`.
        """
        if input_ids is None:
            raise ValueError("`input_ids` are required: NExT-Chat finds its image and box slots by token id")
        _check_kwargs(kwargs, LANGUAGE_MODEL_KWARGS, "NextChatModel.forward")
        inputs_embeds = self.get_input_embeddings()(input_ids)
        inputs_embeds, image_features, image_outputs = self._merge_image_features(
            input_ids, inputs_embeds, pixel_values, kwargs.get("output_attentions")
        )

        box_token_mask = input_ids == self.config.box_token_id
        state = TriggerState.from_cache(cache)
        if state is not None and not bool(state.pending.any()):
            state = None  # no row ended on a trigger: nothing to feed (the common decoding step)
        if state is not None:
            # A trigger ended the previous call: the position after it is fed the predicted box, whatever token
            # it holds, so a `<boxes>` token there needs no entry in `box_inputs`.
            pending = state.pending.to(box_token_mask.device)
            box_token_mask = box_token_mask.clone()
            box_token_mask[:, 0] &= ~pending
        inputs_embeds = self._merge_box_embeddings(
            input_ids, box_token_mask, inputs_embeds, box_inputs, box_inputs_mask, image_features, region_box_mask
        )
        if state is not None:  # a predicted box: loc_encoder alone, never region features
            pending_embeds = self.loc_encoder(state.boxes.to(_dtype_of(self.loc_encoder)))
            first = torch.where(pending[:, None], pending_embeds.to(inputs_embeds.dtype), inputs_embeds[:, 0])
            inputs_embeds = torch.cat([first[:, None], inputs_embeds[:, 1:]], dim=1)

        if position_ids is None and attention_mask is not None and attention_mask.dim() == 2:
            past_length = cache.get_seq_length() if cache is not None else 0
            position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, -input_ids.shape[1] :]
            if past_length == 0 and attention_mask.shape[1] != input_ids.shape[1]:
                raise ValueError(
                    f"`attention_mask` has {attention_mask.shape[1]} columns but `input_ids` has {input_ids.shape[1]}"
                )

        outputs = self.language_model(
            inputs_embeds=inputs_embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        return NextChatModelOutputWithPast(**outputs, image_outputs=image_outputs)


def _select_boxes(box_inputs, box_inputs_mask, boxes_per_row):
    """Boxes of the True slots, row-major, checked against the number of `<boxes>` tokens of each row."""
    if box_inputs.dim() != 3 or box_inputs.shape[-1] != 4:
        raise ValueError(f"`box_inputs` must have shape (batch, num_boxes, 4), got {tuple(box_inputs.shape)}")
    if box_inputs.shape[0] != boxes_per_row.shape[0]:
        raise ValueError(
            f"`box_inputs` has {box_inputs.shape[0]} rows but `input_ids` has {boxes_per_row.shape[0]}"
        )
    if box_inputs_mask is None:
        box_inputs_mask = torch.ones(box_inputs.shape[:2], dtype=torch.bool, device=box_inputs.device)
    if box_inputs_mask.shape != box_inputs.shape[:2]:
        raise ValueError(
            f"`box_inputs_mask` must have shape {tuple(box_inputs.shape[:2])} like `box_inputs`, "
            f"got {tuple(box_inputs_mask.shape)}"
        )
    box_inputs_mask = box_inputs_mask.bool()
    given = box_inputs_mask.sum(dim=1).to(boxes_per_row.device)
    if not torch.equal(given, boxes_per_row):
        raise ValueError(
            f"`box_inputs_mask` gives {given.tolist()} boxes per row but `input_ids` hold {boxes_per_row.tolist()} "
            "`<boxes>` tokens per row; each `<boxes>` token needs exactly one box"
        )
    boxes = box_inputs[box_inputs_mask]
    if not bool(torch.isfinite(boxes).all()):
        raise ValueError("`box_inputs` contain NaN or infinite coordinates")
    return boxes


class NextChatForConditionalGeneration(NextChatGenerationMixin, NextChatPreTrainedModel, GenerationMixin):
    """NExT-Chat with its language-modelling head, box decoder and (optionally) SAM.

    Example:

    ```python
    >>> from nextchat import NextChatForConditionalGeneration, NextChatProcessor
    >>> model = NextChatForConditionalGeneration.from_pretrained("path/to/converted")
    >>> processor = NextChatProcessor.from_pretrained("path/to/converted")
    ```
    """

    _tied_weights_keys = {"lm_head.weight": "model.language_model.embed_tokens.weight"}
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: NextChatConfig):
        super().__init__(config)
        hidden_size = config.text_config.hidden_size
        self.model = NextChatModel(config)
        self.lm_head = nn.Linear(hidden_size, config.text_config.vocab_size, bias=False)
        self.loc_decoder = _mlp(hidden_size, hidden_size // 2, 4)
        if config.sam_config is not None:
            from .sam_nextchat import NextChatSamModel

            prompt_dim = config.sam_config["prompt_embed_dim"]
            self.seg_prompt_mlp = _mlp(hidden_size, hidden_size, config.num_seg_prompt_tokens * prompt_dim)
            self.sam = NextChatSamModel(config.sam_config)
        else:
            self.seg_prompt_mlp = None
            self.sam = None
        # training arguments, not configuration (`NextChatLossWeights`); None: the config's legacy fields
        self.loss_weights = None
        self.post_init()

    def effective_loss_weights(self) -> NextChatLossWeights:
        """The loss weights `forward` uses: `self.loss_weights`, or the config's legacy fields when it is None."""
        weights = getattr(self, "loss_weights", None)
        return weights if weights is not None else NextChatLossWeights.from_config(self.config)

    def get_input_embeddings(self):
        return self.model.get_input_embeddings()

    def set_input_embeddings(self, value):
        self.model.set_input_embeddings(value)

    def get_output_embeddings(self):
        return self.lm_head

    def set_output_embeddings(self, new_embeddings):
        self.lm_head = new_embeddings

    @property
    def loc_encoder(self):
        return self.model.loc_encoder

    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling:
        """See `NextChatModel.get_image_features`."""
        return self.model.get_image_features(
            pixel_values,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            **kwargs,
        )

    def decode_boxes(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """Final-norm hidden states `(..., hidden_size)` -> normalised xyxy boxes `(..., 4)`."""
        boxes = self.loc_decoder(hidden_states.to(_dtype_of(self.loc_decoder)))
        if self.config.box_decoder_activation == "sigmoid":
            boxes = boxes.sigmoid()
        return boxes

    def predict_masks(
        self, sam_pixel_values: torch.Tensor, trigger_hidden_states: torch.Tensor, boxes: torch.Tensor,
        image_index: torch.LongTensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM masks for K triggers; SAM's image encoder runs once per distinct image.

        Args:
            sam_pixel_values: `(B, 3, S, S)` SAM inputs.
            trigger_hidden_states: `(K, hidden_size)` final-norm hidden states at the triggers.
            boxes: `(K, 4)` normalised xyxy boxes (padded-square frame = SAM frame).
            image_index: `(K,)` which row of `sam_pixel_values` each trigger belongs to.

        Returns:
            low-resolution mask logits `(K, h, w)` and predicted IoUs `(K,)`.
        """
        if self.sam is None:
            raise ValueError("`sam_pixel_values` were given but this model has no SAM (`config.sam_config` is None)")
        size = self.sam.image_size
        if sam_pixel_values.dim() != 4 or tuple(sam_pixel_values.shape[1:]) != (3, size, size):
            raise ValueError(
                f"`sam_pixel_values` must have shape (batch, 3, {size}, {size}), got {tuple(sam_pixel_values.shape)}"
            )
        sam_dtype = self.sam.mask_decoder.iou_token.weight.dtype
        prompts = self.seg_prompt_mlp(trigger_hidden_states.to(_dtype_of(self.seg_prompt_mlp)))
        prompts = prompts.view(prompts.shape[0], self.config.num_seg_prompt_tokens, -1)
        images, inverse = torch.unique(image_index, return_inverse=True)
        embeddings = self.sam.get_image_embeddings(sam_pixel_values[images.to(sam_pixel_values.device)].to(sam_dtype))
        pred_masks = iou_scores = None
        for i in range(len(images)):
            selected = torch.nonzero(inverse == i).flatten()
            masks, scores = self.sam.decode_masks(embeddings[i : i + 1], prompts[selected], boxes[selected] * size)
            if pred_masks is None:
                pred_masks = masks.new_empty((len(image_index),) + masks.shape[1:])
                iou_scores = scores.new_empty(len(image_index))
            pred_masks[selected] = masks
            iou_scores[selected] = scores
        return pred_masks, iou_scores

    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache", raise_if_both_names=True)
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        pixel_values: torch.FloatTensor | None = None,
        box_inputs: torch.FloatTensor | None = None,
        box_inputs_mask: torch.BoolTensor | None = None,
        sam_pixel_values: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        mask_targets: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        num_items_in_batch: torch.Tensor | int | dict | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        shift_labels: torch.LongTensor | None = None,
        predict_generated_boxes: bool = False,
        **kwargs: Unpack[TransformersKwargs],
    ) -> NextChatCausalLMOutputWithPast:
        r"""
        Args:
            input_ids (`torch.LongTensor` of shape `(batch_size, sequence_length)`): token ids, image blocks and
                `<at> <boxes>` pairs included.
            pixel_values (`torch.FloatTensor` of shape `(num_images, 3, H, W)`): CLIP inputs of the expand2square
                images, one per image block, in row-major order of the blocks.
            box_inputs (`torch.FloatTensor` of shape `(batch_size, num_boxes, 4)`): normalised xyxy boxes (padded
                square frame); the k-th `<boxes>` of row b is fed `loc_encoder` of the k-th True slot of row b.
            box_inputs_mask (`torch.BoolTensor` of shape `(batch_size, num_boxes)`): which slots hold boxes.
            sam_pixel_values (`torch.FloatTensor` of shape `(batch_size, 3, S, S)`): SAM inputs; masks are computed
                only when given.
            labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`): LM targets, -100 = ignored. A
                trigger whose label is not ignored is an assistant trigger: its box is trained against the box of
                the `<boxes>` that follows it.
            mask_targets (`torch.FloatTensor` of shape `(batch_size, num_boxes, h, w)`): binary masks in the SAM
                input frame aligned with `box_inputs`; a slot filled with negative values has no mask.
            image_sizes (`torch.LongTensor` of shape `(batch_size, 2)`): original `(height, width)` from the
                processor; not needed by the model (accepted so that `model(**processor(...))` works).
            cache (`Cache`, *optional*): the key/value cache of earlier calls; `past_key_values` is accepted as
                the same argument under transformers' older, deprecated name (one of the two, not both).
            shift_labels (`torch.LongTensor` of shape `(batch_size, sequence_length)`, *optional*): LM targets
                already shifted (`shift_labels[:, t]` is the target of the logits at `t`), as transformers' causal-LM
                loss takes them (e.g. under context parallelism); used for the LM term instead of shifting `labels`,
                which still select the answer triggers.
            predict_generated_boxes (`bool`, *optional*, defaults to `False`): `<boxes>` tokens beyond those that
                `box_inputs` fill (in order, per row), each right after a `<at>`, are fed the box predicted at that
                `<at>`, as during generation. `generate(use_cache=False)` sets it; without it such tokens are a
                `ValueError`.
            inputs_embeds: not supported (a `ValueError` unless `None`); accepted so that wrappers such as PEFT's
                `PeftModelForCausalLM`, which always pass it, work.
            return_dict (`bool`, *optional*): `False` returns a tuple of the non-`None` output fields.
            region_box_mask (`torch.BoolTensor` of shape `(batch_size, sequence_length)`): with
                `config.box_region_features`, the `<boxes>` that get their region's image features. Default: all but
                the answer boxes (those after a labelled trigger) when `labels` are given, else all.
            num_items_in_batch (`int`, `torch.Tensor` or `dict`): normaliser(s) over a gradient-accumulated batch.
                An int is the number of LM target tokens (what `Trainer` passes); a dict from
                `count_loss_items` summed over the micro-batches makes every term exact.
        """
        if inputs_embeds is not None:
            raise ValueError(
                "`inputs_embeds` are not supported: NExT-Chat builds its input embeddings from `input_ids` (image and "
                "box slots are found by token id); pass `input_ids`"
            )
        _check_kwargs(kwargs, LANGUAGE_MODEL_KWARGS | {"region_box_mask"}, "NextChatForConditionalGeneration.forward")
        if shift_labels is not None and labels is None:
            raise ValueError("`shift_labels` need `labels` too (they select the answer triggers of the box losses)")
        if shift_labels is not None and shift_labels.shape != input_ids.shape:
            raise ValueError(
                f"`shift_labels` must have the shape of `input_ids` {tuple(input_ids.shape)}, got {tuple(shift_labels.shape)}"
            )
        if predict_generated_boxes:
            box_inputs, box_inputs_mask = self._predicted_box_inputs(
                input_ids, attention_mask, position_ids, cache, pixel_values, box_inputs, box_inputs_mask
            )
        if use_cache is None and labels is not None:
            use_cache = False  # training needs no key/value cache
        if box_inputs is not None and box_inputs_mask is None:
            box_inputs_mask = torch.ones(box_inputs.shape[:2], dtype=torch.bool, device=box_inputs.device)
        weights = self.effective_loss_weights()
        if labels is not None and (weights.grounding_attention_loss_weight or weights.region_attention_loss_weight):
            kwargs["output_attentions"] = True
        if labels is not None and self.config.box_region_features:
            answer_boxes = _answer_box_positions(input_ids, labels, self.config.trigger_token_id)
            kwargs.setdefault("region_box_mask", ~answer_boxes)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            pixel_values=pixel_values,
            box_inputs=box_inputs,
            box_inputs_mask=box_inputs_mask,
            use_cache=use_cache,
            return_dict=True,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        new_cache = outputs.cache
        if isinstance(logits_to_keep, int):
            kept = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            kept = hidden_states[:, logits_to_keep]
        logits = self.lm_head(kept)

        trigger_positions = torch.nonzero(input_ids == self.config.trigger_token_id)
        trigger_hidden = hidden_states[trigger_positions[:, 0], trigger_positions[:, 1]]
        pred_boxes = self.decode_boxes(trigger_hidden) if len(trigger_hidden) else trigger_hidden.new_zeros((0, 4))

        if new_cache is not None:
            last_is_trigger = input_ids[:, -1] == self.config.trigger_token_id
            last_hidden = hidden_states[:, -1]
            if bool(last_is_trigger.any()):
                last_boxes = self.decode_boxes(last_hidden)
            else:
                last_boxes = last_hidden.new_zeros((last_hidden.shape[0], 4))
            self._record_triggers(new_cache, last_is_trigger, last_boxes, last_hidden)

        answers = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(
                    f"`labels` must have the shape of `input_ids` {tuple(input_ids.shape)}, got {tuple(labels.shape)}"
                )
            answers = self._answer_box_slots(input_ids, labels, box_inputs, box_inputs_mask, trigger_positions)

        pred_masks = iou_scores = None
        if sam_pixel_values is not None and trigger_positions.shape[0] > 0:
            prompt_boxes = pred_boxes
            if self.config.sam_box_prompt == "target" and answers is not None and answers[1] is not None:
                assistant, slots = answers
                prompt_boxes = pred_boxes.detach().clone()
                prompt_boxes[assistant] = box_inputs[slots[:, 0], slots[:, 1]].to(prompt_boxes.dtype)
            pred_masks, iou_scores = self.predict_masks(
                sam_pixel_values, trigger_hidden, prompt_boxes, trigger_positions[:, 0]
            )
        elif mask_targets is not None and self.sam is None:
            raise ValueError("`mask_targets` were given but this model has no SAM (`config.sam_config` is None)")

        output = NextChatCausalLMOutputWithPast(
            logits=logits,
            cache=new_cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
            trigger_positions=trigger_positions,
            pred_boxes=pred_boxes,
            pred_masks=pred_masks,
            iou_scores=iou_scores,
        )
        if labels is not None:
            self._compute_losses(
                output, input_ids, labels, answers, trigger_hidden, box_inputs, box_inputs_mask, mask_targets,
                sam_pixel_values, num_items_in_batch, logits_to_keep, shift_labels,
            )
        return output

    def _predicted_box_inputs(self, input_ids, attention_mask, position_ids, cache, pixel_values, box_inputs,
                              box_inputs_mask):
        """`box_inputs` `(B, N + K, 4)` and mask extended, per row, with the boxes predicted at the triggers before the
        `<boxes>` tokens that the given boxes do not fill (K at most per row). Without a cache each prediction needs
        the ones before it, so the language model runs K times here (once per generated trigger of the longest
        row), each pass making one more box exact."""
        config = self.config
        if cache is not None and cache.get_seq_length() > 0:
            raise ValueError("`predict_generated_boxes` works on whole sequences; with a cache the boxes travel on it")
        box_tokens = input_ids == config.box_token_id
        rows = input_ids.shape[0]
        given = (box_inputs_mask.bool().sum(1) if box_inputs is not None else input_ids.new_zeros(rows)).to(
            input_ids.device
        )
        generated = box_tokens & ((box_tokens.long().cumsum(1) - 1) >= given[:, None])
        if not bool(generated.any()):
            return box_inputs, box_inputs_mask
        after_trigger = torch.zeros_like(generated)
        after_trigger[:, 1:] = input_ids[:, :-1] == config.trigger_token_id
        if bool((generated & ~after_trigger).any()):
            raise ValueError("a `<boxes>` token without a box in `box_inputs` must follow a `<at>` to be predicted")
        given_width = box_inputs.shape[1] if box_inputs is not None else 0
        rank = generated.long().cumsum(1) - 1
        rows_at, columns_at = torch.nonzero(generated, as_tuple=True)
        slots = given_width + rank[rows_at, columns_at]
        width = given_width + int(generated.sum(1).max())
        dtype = box_inputs.dtype if box_inputs is not None else torch.float32
        boxes = torch.zeros((rows, width, 4), dtype=dtype, device=input_ids.device)
        mask = torch.zeros((rows, width), dtype=torch.bool, device=input_ids.device)
        if box_inputs is not None:
            boxes[:, :given_width] = box_inputs.to(boxes.device)
            mask[:, :given_width] = box_inputs_mask.bool().to(mask.device)
        mask[rows_at, slots] = True
        for _ in range(int(generated.sum(1).max())):
            hidden = self.model(
                input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                pixel_values=pixel_values, box_inputs=boxes, box_inputs_mask=mask, use_cache=False,
                return_dict=True,
            ).last_hidden_state
            boxes = boxes.clone()
            boxes[rows_at, slots] = self.decode_boxes(hidden[rows_at, columns_at - 1]).to(boxes.dtype)
        return boxes, mask

    def _answer_box_slots(self, input_ids, labels, box_inputs, box_inputs_mask, trigger_positions):
        """Which triggers are answer (labelled) triggers, `(K,)` bool, and the `(row, slot)` in `box_inputs` of the
        box each is trained on, `(n_answer, 2)` (None without answer triggers). Shared by SAM's target prompts and
        the losses."""
        assistant = labels[trigger_positions[:, 0], trigger_positions[:, 1]] != IGNORE_INDEX
        if not bool(assistant.any()):
            return assistant, None
        slots = _assistant_box_slots(
            input_ids, labels, box_inputs_mask if box_inputs is not None else None, self.config.trigger_token_id,
            self.config.box_token_id, box_inputs=box_inputs,
        )
        return assistant, slots

    @staticmethod
    def count_loss_items(
        input_ids, labels, box_inputs_mask=None, mask_targets=None, trigger_token_id=None, box_token_id=None,
        region_turns: bool = True, shift_labels=None,
    ) -> dict:
        """Item counts of each loss term in one micro-batch; sum them over micro-batches and pass the sums as
        `num_items_in_batch` to make every term exactly the mean over the accumulated batch. `region_turns=False`
        skips counting region-caption turns (left at 0); `shift_labels`, when the LM targets come pre-shifted."""
        shifted = labels[:, 1:] if shift_labels is None else shift_labels
        targets = (shifted != IGNORE_INDEX) & (shifted != box_token_id)
        assistant = (input_ids == trigger_token_id) & (labels != IGNORE_INDEX)
        counts = {
            "tokens": int(targets.sum()),
            "boxes": int(assistant.sum()),
            "input_boxes": int(box_inputs_mask.sum()) if box_inputs_mask is not None else 0,
            "masks": 0,
            "region_turns": 0,
        }
        if region_turns and box_inputs_mask is not None and counts["input_boxes"]:
            _, _, weights = _region_caption_queries(input_ids, labels, box_inputs_mask, trigger_token_id, box_token_id)
            counts["region_turns"] = round(float(weights.sum()))
        if mask_targets is not None and counts["boxes"]:
            slots = _assistant_box_slots(input_ids, labels, box_inputs_mask, trigger_token_id, box_token_id)
            has_mask = (mask_targets.flatten(2) >= 0).all(-1)
            counts["masks"] = int(has_mask[slots[:, 0], slots[:, 1]].sum())
        return counts

    def _compute_losses(
        self, output, input_ids, labels, answers, trigger_hidden, box_inputs, box_inputs_mask, mask_targets,
        sam_pixel_values, num_items_in_batch, logits_to_keep, shift_labels=None,
    ):
        config = self.config
        weights = self.effective_loss_weights()
        if logits_to_keep not in (0, None):
            raise ValueError("`labels` need logits for every position; do not pass `logits_to_keep` with them")
        local = self.count_loss_items(
            input_ids, labels, box_inputs_mask, mask_targets, config.trigger_token_id, config.box_token_id,
            region_turns=bool(weights.region_attention_loss_weight),  # not on the forward path when the term is off
            shift_labels=shift_labels,
        )
        normalisers = _normalisers(local, num_items_in_batch)

        if shift_labels is None:
            shift_labels = torch.cat([labels[:, 1:], labels.new_full((labels.shape[0], 1), IGNORE_INDEX)], dim=1)
        shift_labels = shift_labels.masked_fill(shift_labels == config.box_token_id, IGNORE_INDEX)
        ce = nn.functional.cross_entropy(
            output.logits.float().flatten(0, 1),
            shift_labels.flatten().to(output.logits.device),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        output.lm_loss = ce / normalisers["tokens"]
        total = weights.lm_loss_weight * output.lm_loss

        is_trigger = output.trigger_positions
        assistant, slots = answers
        if slots is not None:
            targets = box_inputs[slots[:, 0], slots[:, 1]].to(output.pred_boxes.dtype)
            pred = output.pred_boxes[assistant]
            l1, giou = box_losses(pred, targets)
            output.box_l1_loss = l1 / (4 * normalisers["boxes"])
            output.box_giou_loss = giou / normalisers["boxes"]
            hidden = trigger_hidden[assistant]
            reencoded = self.loc_encoder(pred.to(_dtype_of(self.loc_encoder)))
            cycle = ((reencoded.float() - hidden.float()) ** 2).sum()
            output.cycle_embed_loss = cycle / (hidden.shape[-1] * normalisers["boxes"])
            total = (
                total
                + weights.box_l1_loss_weight * output.box_l1_loss
                + weights.box_giou_loss_weight * output.box_giou_loss
                + weights.cycle_embed_loss_weight * output.cycle_embed_loss
            )
            if mask_targets is not None and sam_pixel_values is not None:
                total = total + self._mask_loss(output, assistant, slots, mask_targets, normalisers)
            elif mask_targets is not None:
                raise ValueError("`mask_targets` need `sam_pixel_values` to predict masks")

        if box_inputs is not None and local["input_boxes"]:
            boxes = box_inputs[box_inputs_mask.bool()] if box_inputs_mask is not None else box_inputs.flatten(0, 1)
            boxes = boxes.to(_dtype_of(self.loc_encoder))
            cycled = self.decode_boxes(self.loc_encoder(boxes))
            output.cycle_box_loss = (cycled.float() - boxes.float()).abs().sum() / (4 * normalisers["input_boxes"])
            total = total + weights.cycle_box_loss_weight * output.cycle_box_loss

        if weights.grounding_attention_loss_weight and bool(assistant.any()):
            # Only the triggers: also asking each `<boxes>` to look at the box it is fed (for region captions)
            # was measured to stop the triggers from learning to find objects by name.
            per_query, _ = self._attention_mass_loss(
                output, input_ids, is_trigger[assistant], targets.float(), config.grounding_attention_heads
            )
            output.grounding_attention_loss = per_query.sum() / normalisers["boxes"]
            total = total + weights.grounding_attention_loss_weight * output.grounding_attention_loss
        if weights.region_attention_loss_weight and box_inputs is not None:
            queries, slots, turn_weights = _region_caption_queries(
                input_ids, labels, box_inputs_mask, config.trigger_token_id, config.box_token_id
            )
            if queries.shape[0]:
                boxes = box_inputs[slots[:, 0], slots[:, 1]].float()
                per_query, usable = self._attention_mass_loss(
                    output, input_ids, queries, boxes, config.region_attention_heads
                )
                output.region_attention_loss = (per_query * turn_weights[usable]).sum() / normalisers["region_turns"]
                total = total + weights.region_attention_loss_weight * output.region_attention_loss
        output.loss = total

    def _attention_mass_loss(self, output, input_ids, queries, query_boxes, heads=None):
        """`(K',)` `per_query_attention_loss` of the `(K, 2)` (row, column) `queries` over the patches of their
        `(K, 4)` target boxes, averaged over the supervised layers, and the `(K,)` bool of the queries kept: a query
        counts only in a row with one image block before it, whose patches its box is laid on."""
        config = self.config
        attentions = output.attentions
        if not attentions or any(attention is None for attention in attentions):
            raise ValueError(
                "`grounding_attention_loss_weight` > 0 needs attention probabilities, which only eager attention "
                "returns: load the model with `attn_implementation=\"eager\"` or call "
                "`model.set_attn_implementation(\"eager\")`"
            )
        num_layers = len(attentions)
        layers = config.grounding_attention_layers or list(range(1, num_layers)) or [0]
        num_patches = config.image_seq_length
        is_patch = input_ids == config.image_token_id
        # column of each image patch of a row, in row-major patch order (a stable sort keeps the token order)
        patch_columns = torch.sort(is_patch.to(torch.uint8), dim=1, descending=True, stable=True).indices
        patch_columns = patch_columns[:, :num_patches]
        rows, columns = queries[:, 0], queries[:, 1]
        usable = (is_patch.sum(1)[rows] == num_patches) & (patch_columns[rows, -1] < columns)
        rows, columns, query_boxes = rows[usable], columns[usable], query_boxes[usable]
        patch_columns = patch_columns[rows]
        per_layer = []
        for layer in layers:
            trigger_rows = attentions[layer][rows, :, columns]  # (K, heads, seq_len)
            if heads is not None:
                trigger_rows = trigger_rows[:, list(heads)]
            index = patch_columns[:, None, :].expand(-1, trigger_rows.shape[1], -1).to(trigger_rows.device)
            per_layer.append(torch.gather(trigger_rows, 2, index))
        targets = box_patch_targets(query_boxes, math.isqrt(num_patches))
        per_query = per_query_attention_loss(
            torch.stack(per_layer), targets.to(per_layer[0].device), per_head=config.attention_loss_per_head
        )
        return per_query / len(layers), usable

    def _mask_loss(self, output, assistant, slots, mask_targets, normalisers):
        config = self.config
        targets = mask_targets[slots[:, 0], slots[:, 1]]
        has_mask = (targets.flatten(1) >= 0).all(-1)
        if not bool(has_mask.any()):
            return 0.0
        logits = output.pred_masks[assistant][has_mask]
        targets = targets[has_mask]
        logits = nn.functional.interpolate(
            logits[:, None].float(), size=targets.shape[-2:], mode="bilinear", align_corners=False
        )[:, 0]
        ce, dice, iou = mask_losses(
            logits, targets, output.iou_scores[assistant][has_mask], config.mask_loss_type,
            config.mask_focal_alpha, config.mask_focal_gamma, config.mask_dice_smooth,
        )
        output.mask_ce_loss = ce / normalisers["masks"]
        output.mask_dice_loss = dice / normalisers["masks"]
        output.mask_iou_loss = iou / normalisers["masks"]
        weights = self.effective_loss_weights()
        return (
            weights.mask_ce_loss_weight * output.mask_ce_loss
            + weights.mask_dice_loss_weight * output.mask_dice_loss
            + weights.mask_iou_loss_weight * output.mask_iou_loss
        )


def _answer_box_positions(input_ids, labels, trigger_token_id):
    """`(B, T)` bool: the positions right after an answer (labelled) trigger, i.e. the `<boxes>` of the answer."""
    answer_trigger = (input_ids == trigger_token_id) & (labels != IGNORE_INDEX)
    return torch.nn.functional.pad(answer_trigger[:, :-1], (1, 0), value=False)


def _region_caption_queries(input_ids, labels, box_inputs_mask, trigger_token_id, box_token_id):
    """The positions that predict the tokens of each region-caption turn — an assistant (labelled) turn without a
    labelled `<at>` whose preceding user turn gives exactly one `<boxes>` — as `(Q, 2)` (row, column), the
    `(Q, 2)` (row, slot) of that box in `box_inputs`, and `(Q,)` weights that sum to 1 over each turn."""
    # an answer's own `<boxes>` (unlabelled, right after its labelled trigger) belongs to the answer
    labelled = (labels != IGNORE_INDEX) | _answer_box_positions(input_ids, labels, trigger_token_id)
    starts = labelled & ~torch.nn.functional.pad(labelled[:, :-1], (1, 0), value=False)
    turn = starts.long().cumsum(1)  # labelled: its turn (1-based); unlabelled: the turn before it (0: none)
    batch, length = input_ids.shape
    num_turns = int(turn.max()) + 2 if length else 2
    given = (input_ids == box_token_id) & ~labelled
    rows = torch.arange(batch, device=input_ids.device)[:, None].expand(batch, length)
    # a given box belongs to the assistant turn that follows it
    given_count = torch.zeros(batch, num_turns, dtype=torch.long, device=input_ids.device)
    given_count.index_put_((rows[given], turn[given] + 1), torch.ones_like(turn[given]), accumulate=True)
    grounds = torch.zeros_like(given_count)
    answer_trigger = (input_ids == trigger_token_id) & labelled
    grounds.index_put_((rows[answer_trigger], turn[answer_trigger]), torch.ones_like(turn[answer_trigger]),
                       accumulate=True)
    ordinal = (input_ids == box_token_id).long().cumsum(1) - 1
    box_ordinal = torch.zeros_like(given_count)
    box_ordinal[rows[given], turn[given] + 1] = ordinal[given]
    qualifies = (given_count == 1) & (grounds == 0)
    predicted = (labels != IGNORE_INDEX) & qualifies.gather(1, turn)  # label positions of qualifying turns
    predicted[:, 0] = False  # position 0 cannot be predicted
    q_rows, q_cols = torch.nonzero(predicted, as_tuple=True)
    q_turns = turn[q_rows, q_cols]
    size = torch.zeros_like(given_count)
    size.index_put_((q_rows, q_turns), torch.ones_like(q_turns), accumulate=True)
    weights = 1.0 / size[q_rows, q_turns].float()
    slots = _slot_of_ordinal(box_inputs_mask)[q_rows, box_ordinal[q_rows, q_turns]]
    return torch.stack([q_rows, q_cols - 1], 1), torch.stack([q_rows, slots], 1), weights


def _assistant_box_slots(input_ids, labels, box_inputs_mask, trigger_token_id, box_token_id, box_inputs=None):
    """`(K, 2)` (row, slot) indices into `box_inputs` of the box that follows each assistant trigger, row-major."""
    triggers = torch.nonzero((input_ids == trigger_token_id) & (labels != IGNORE_INDEX))
    rows, cols = triggers[:, 0], triggers[:, 1]
    next_cols = cols + 1
    if bool((next_cols >= input_ids.shape[1]).any()) or not bool(
        (input_ids[rows, next_cols.clamp(max=input_ids.shape[1] - 1)] == box_token_id).all()
    ):
        raise ValueError(
            "with `labels`, every assistant `<at>` must be followed by `<boxes>` carrying its target box in `box_inputs`"
        )
    if box_inputs_mask is None and box_inputs is None:
        raise ValueError("`labels` contain assistant `<at>` triggers but no `box_inputs` hold their target boxes")
    if box_inputs_mask is None:
        box_inputs_mask = torch.ones(box_inputs.shape[:2], dtype=torch.bool, device=input_ids.device)
    box_ordinal = ((input_ids == box_token_id).long().cumsum(dim=1) - 1)[rows, next_cols]
    return torch.stack([rows, _slot_of_ordinal(box_inputs_mask)[rows, box_ordinal]], dim=1)


def _slot_of_ordinal(box_inputs_mask):
    """`(B, S)`: the slot index in `box_inputs` of each row's n-th `<boxes>` token (the n-th True slot of
    `box_inputs_mask`), -1 past the last."""
    mask = box_inputs_mask.bool()
    slot_of_ordinal = torch.full_like(mask, -1, dtype=torch.long)
    slot_rows, slot_cols = torch.nonzero(mask, as_tuple=True)
    slot_of_ordinal[slot_rows, (mask.long().cumsum(dim=1) - 1)[slot_rows, slot_cols]] = slot_cols
    return slot_of_ordinal


def _normalisers(local: dict, num_items_in_batch) -> dict:
    """Divisors of each summed loss term: the counts of the whole accumulated batch when known."""
    if isinstance(num_items_in_batch, dict):
        counts = {**local, **num_items_in_batch}  # a key the caller did not count: this micro-batch's own
    elif num_items_in_batch is not None:
        # Only the token count of the whole batch is known: scale every other term by this micro-batch's share of
        # the tokens, so that summing the micro-batch losses gives a token-weighted mean rather than a sum.
        share = float(num_items_in_batch) / max(local["tokens"], 1)
        counts = {key: value * share for key, value in local.items()}
        counts["tokens"] = num_items_in_batch
    else:
        counts = local
    return {key: (value.clamp(min=1) if torch.is_tensor(value) else max(value, 1)) for key, value in counts.items()}


__all__ = [
    "NextChatLossWeights",
    "NextChatPreTrainedModel",
    "NextChatModel",
    "NextChatForConditionalGeneration",
    "NextChatModelOutputWithPast",
    "NextChatCausalLMOutputWithPast",
]
