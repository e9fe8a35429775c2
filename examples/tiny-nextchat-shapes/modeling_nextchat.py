"""PyTorch NExT-Chat (pix2emb): a LLaVA-style chat model whose locations are embeddings.

The last-layer hidden state at every trigger token `<at>` is decoded by `loc_decoder` into a normalised xyxy box
(and, through `seg_prompt_mlp` and SAM, into a mask); the position after it, `<boxes>`, is fed `loc_encoder(box)`.
"""

import importlib
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

from .configuration_nextchat import NextChatConfig
from .generation_nextchat import NextChatGenerationMixin, TriggerState
from .loss_nextchat import (
    IGNORE_INDEX,
    NextChatLossWeights,
    answer_box_slots,
    check_label_inputs,
    compute_losses,
    lm_targets,
)


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
        logits (`torch.FloatTensor` of shape `(batch_size, sequence_length, vocab_size)`): None in a training-mode
            forward with `labels` when the model's `logits_in_training` is "targets".
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
        mask_iou_loss: the unweighted loss terms (each normalised by its own item count).
        grounding_attention_loss, region_attention_loss: the terms of a training objective wrapped around the
            model (`nextchat.training.AttentionSupervision`), when one is attached; declared here so that the output
            keeps one type through `torch.utils._pytree` (DDP, `torch.compile`).
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
        """Puts the projected patch features at the `<im_patch>` slots; also returns `get_image_features`' output
        (`None` without `pixel_values`)."""
        image_mask = input_ids == self.config.image_token_id
        per_image = self.config.image_seq_length
        if pixel_values is None:
            if bool(image_mask.any()):
                num_tokens = int(image_mask.sum())
                raise ValueError(
                    f"`input_ids` hold {num_tokens} image placeholders (`<im_patch>`, id {self.config.image_token_id}) "
                    "but no `pixel_values` were given"
                )
            return inputs_embeds, None
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
        return inputs_embeds.masked_scatter(image_mask.unsqueeze(-1), flat), image_outputs

    def _merge_box_embeddings(self, box_token_mask, inputs_embeds, box_inputs, box_inputs_mask):
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
        use_cache: bool | None = None,
        **kwargs: Unpack[TransformersKwargs],
    ) -> NextChatModelOutputWithPast:
        """Embeds `input_ids` (image features at `<im_patch>`, `loc_encoder(box)` at `<boxes>`) and runs the LM.

        `input_ids` are required: the positions of the NExT-Chat tokens are read from them.
        """
        if input_ids is None:
            raise ValueError("`input_ids` are required: NExT-Chat finds its image and box slots by token id")
        _check_kwargs(kwargs, LANGUAGE_MODEL_KWARGS, "NextChatModel.forward")
        inputs_embeds = self.get_input_embeddings()(input_ids)
        inputs_embeds, image_outputs = self._merge_image_features(
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
        inputs_embeds = self._merge_box_embeddings(box_token_mask, inputs_embeds, box_inputs, box_inputs_mask)
        if state is not None:
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
        # training arguments, not configuration: never saved in config.json (the stage presets set them)
        self.loss_weights = NextChatLossWeights()
        # the box SAM is prompted with in training: "predicted" (the original's: the trigger's decoded box) or
        # "target" (an answer trigger's ground-truth box, for a SAM trained from scratch); generation: predicted
        self.sam_box_prompt = "predicted"
        # where a training forward with `labels` computes the LM head: "all" positions (`logits` of the whole
        # sequence), or only the "targets" (positions with an LM target; `logits` is then None): on a small model
        # most positions are image patches and prompt, and the head's product is a large share of the step
        self.logits_in_training = "all"
        self.post_init()

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
        prompts = self.seg_prompt_mlp(trigger_hidden_states.to(_dtype_of(self.seg_prompt_mlp)))
        prompts = prompts.view(prompts.shape[0], self.config.num_seg_prompt_tokens, -1)
        return self.sam.predict_masks(sam_pixel_values, prompts, boxes, image_index)

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
            num_items_in_batch (`int`, `torch.Tensor` or `dict`): normaliser(s) over a gradient-accumulated batch.
                An int is the number of LM target tokens (what `Trainer` passes); a dict of `count_loss_items`
                (`loss_nextchat`) summed over the micro-batches makes every term exact.
        """
        if inputs_embeds is not None:
            raise ValueError(
                "`inputs_embeds` are not supported: NExT-Chat builds its input embeddings from `input_ids` (image and "
                "box slots are found by token id); pass `input_ids`"
            )
        _check_kwargs(kwargs, LANGUAGE_MODEL_KWARGS, "NextChatForConditionalGeneration.forward")
        check_label_inputs(input_ids, labels, shift_labels, logits_to_keep)
        if predict_generated_boxes:
            box_inputs, box_inputs_mask = self._predicted_box_inputs(
                input_ids, attention_mask, position_ids, cache, pixel_values, box_inputs, box_inputs_mask
            )
        if use_cache is None and labels is not None:
            use_cache = False  # training needs no key/value cache
        if box_inputs is not None and box_inputs_mask is None:
            box_inputs_mask = torch.ones(box_inputs.shape[:2], dtype=torch.bool, device=box_inputs.device)
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
        if self.logits_in_training not in ("all", "targets"):
            raise ValueError(f"`logits_in_training` must be 'all' or 'targets', got {self.logits_in_training!r}")
        logits = target_logits = None
        if labels is not None and self.training and self.logits_in_training == "targets":
            targets = lm_targets(labels, shift_labels, self.config.box_token_id).to(hidden_states.device)
            targeted = targets != IGNORE_INDEX
            target_logits = (self.lm_head(hidden_states[targeted]), targets[targeted])
        elif isinstance(logits_to_keep, int):
            logits = self.lm_head(hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states)
        else:
            logits = self.lm_head(hidden_states[:, logits_to_keep])

        trigger_positions = torch.nonzero(input_ids == self.config.trigger_token_id)
        trigger_hidden = hidden_states[trigger_positions[:, 0], trigger_positions[:, 1]]
        pred_boxes = self.decode_boxes(trigger_hidden) if len(trigger_hidden) else trigger_hidden.new_zeros((0, 4))

        if new_cache is not None:
            self._record_last_position(new_cache, input_ids, hidden_states)

        answers = None
        if labels is not None:
            answers = answer_box_slots(input_ids, labels, box_inputs, box_inputs_mask, trigger_positions, self.config)

        pred_masks = iou_scores = None
        if sam_pixel_values is not None and trigger_positions.shape[0] > 0:
            prompt_boxes = pred_boxes
            if self.sam_box_prompt not in ("predicted", "target"):
                raise ValueError(f"`sam_box_prompt` must be 'predicted' or 'target', got {self.sam_box_prompt!r}")
            if self.sam_box_prompt == "target" and answers is not None and answers[1] is not None:
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
            inputs = dict(input_ids=input_ids, labels=labels, box_inputs=box_inputs, box_inputs_mask=box_inputs_mask,
                          mask_targets=mask_targets, sam_pixel_values=sam_pixel_values, shift_labels=shift_labels,
                          target_logits=target_logits)
            compute_losses(self, output, inputs, answers, trigger_hidden, num_items_in_batch)
        return output


__all__ = [
    "NextChatPreTrainedModel",
    "NextChatModel",
    "NextChatForConditionalGeneration",
    "NextChatModelOutputWithPast",
    "NextChatCausalLMOutputWithPast",
]
