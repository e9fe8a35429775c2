"""The grounding pipeline of NExT-Chat: an image and a question in, the answer and its grounded entities out.

Every folder that ``save_pretrained`` writes ships this file and names it in ``config.json`` (``custom_pipelines``),
so that, where ``nextchat`` is not installed::

    from transformers import pipeline

    pipe = pipeline("grounded-image-text-to-text", model="path/or/hub-id", trust_remote_code=True)
    pipe(image, "Where is the red circle?")
    # {"text": "The red circle [...]", "entities": [{"text": "The red circle", "span": (0, 14),
    #   "box": [x1, y1, x2, y2], "box_normalized": [...], "mask": bool array or None, "score": 0.93}]}

The entities are exactly what ``NextChatProcessor.post_process_generation`` returns for the same generation.
"""

import math

import numpy as np
from transformers import GenerationConfig, Pipeline
from transformers.image_utils import load_image


TASK = "grounded-image-text-to-text"

# The `custom_pipelines` entry of config.json (transformers resolves "pt" names on the `transformers` module).
CUSTOM_PIPELINES = {
    TASK: {
        "impl": "pipeline_nextchat.NextChatGroundingPipeline",
        "pt": ["AutoModelForImageTextToText"],
        "type": "multimodal",
    }
}


def _is_image(value) -> bool:
    if isinstance(value, str):
        return True
    if isinstance(value, np.ndarray):
        return value.ndim in (2, 3)
    if hasattr(value, "ndim") and hasattr(value, "shape"):  # torch tensor
        return value.ndim in (2, 3)
    return hasattr(value, "convert") and hasattr(value, "size")  # PIL image


def _box_list(value, name: str):
    """`[[x1, y1, x2, y2], ...]` (or an (n, 4) array) -> list of 4-float lists; `None`/`[]` -> []."""
    if value is None:
        return []
    try:
        array = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a list of [x1, y1, x2, y2] pixel boxes, got {value!r}") from None
    if array.size == 0:
        return []
    if array.ndim == 1 and array.shape[0] == 4:
        array = array[None]
    if array.ndim != 2 or array.shape[1] != 4:
        raise ValueError(f"`{name}` must be a list of [x1, y1, x2, y2] pixel boxes, got shape {tuple(array.shape)}")
    return array.tolist()


class NextChatGroundingPipeline(Pipeline):
    r"""
    Grounded visual chat with NExT-Chat: ``pipe(image, question)`` returns the answer and one entity per grounded
    phrase.

    Args (of ``__call__``):
        images: an image (PIL image, numpy/torch array, local path or URL) or a list of them (a batch).
        text (`str` or `list[str]`): the question, one per image or one for all. Refer to user boxes as ``[i]``.
        boxes: pixel ``[x1, y1, x2, y2]`` boxes on the original image, referred to from the question as ``[0]``,
            ``[1]``, ...: a list of boxes for one image, a list of such lists (one per image) for a batch.
        threshold (`float`, *optional*, defaults to 0.0): masks are ``logits > threshold`` (SAM's mask logits;
            0.0 is probability 0.5), as ``mask_threshold`` of ``post_process_generation``.
        max_new_tokens (`int`), generate_kwargs (`dict`): generation options (greedy, 128 new tokens unless the
            model's generation config says otherwise); generation options may also be passed directly.
        timeout (`float`): for images given as URLs.

    Returns:
        For one image a dict ``{"text": answer, "entities": [...]}``, for a batch a list of them (a list of lists
        with ``num_return_sequences`` > 1). Each entity is what ``NextChatProcessor.post_process_generation``
        returns: ``text`` and ``span`` (the grounded phrase and its ``(start, end)`` in the answer), ``box``
        (``[x1, y1, x2, y2]`` in original-image pixels), ``box_normalized`` (the raw model output), ``mask`` (bool
        ``(height, width)`` when the model has SAM, else ``None``) and ``score`` (SAM's IoU prediction; else the
        probability of the trigger token when scores are returned; else ``None``).
    """

    _load_processor = True
    _load_image_processor = False
    _load_feature_extractor = False
    _load_tokenizer = False
    _pipeline_calls_generate = True
    _default_generation_config = GenerationConfig(max_new_tokens=128)

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if getattr(self.model.config, "model_type", None) != "nextchat":
            raise ValueError(
                f"`model` must be a NExT-Chat model (model_type 'nextchat'), got {self.model.config.model_type!r}"
            )
        if self.processor is None or not hasattr(self.processor, "post_process_generation"):
            raise ValueError("`processor` must be the model's NextChatProcessor (AutoProcessor of its folder)")
        # decoder-only generation of a batch pads on the left (the batch collator follows the tokenizer)
        if self.tokenizer is not None:
            self.tokenizer.padding_side = "left"

    def _sanitize_parameters(
        self, threshold=None, max_new_tokens=None, generate_kwargs=None, timeout=None, **kwargs
    ):
        if kwargs:
            raise ValueError(
                f"{type(self).__name__} got unknown arguments {sorted(kwargs)}; it takes `images`, `text`, `boxes`, "
                "`threshold`, `max_new_tokens`, `generate_kwargs`, `timeout` and generation options"
            )
        preprocess_params, forward_params = {}, {}
        if timeout is not None:
            preprocess_params["timeout"] = timeout
        if generate_kwargs is not None:
            if not isinstance(generate_kwargs, dict):
                raise ValueError(f"`generate_kwargs` must be a dict, got {type(generate_kwargs).__name__}")
            generate_kwargs = dict(generate_kwargs)
            if generate_kwargs.pop("return_dict_in_generate", True) is not True:
                raise ValueError("`generate_kwargs`: the grounding pipeline needs `return_dict_in_generate=True`")
        if max_new_tokens is not None:
            generate_kwargs = dict(generate_kwargs or {})
            if "max_new_tokens" in generate_kwargs:
                raise ValueError("`max_new_tokens` is given twice: directly and in `generate_kwargs`")
            generate_kwargs["max_new_tokens"] = max_new_tokens
        if generate_kwargs is not None:
            forward_params["generate_kwargs"] = generate_kwargs
        if threshold is not None:
            if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not math.isfinite(threshold):
                raise ValueError(f"`threshold` must be a finite number (a mask-logit threshold), got {threshold!r}")
            forward_params["threshold"] = float(threshold)
        return preprocess_params, forward_params, {}

    def __call__(self, images=None, text=None, boxes=None, **kwargs):
        """See the class docstring."""
        if images is None:
            raise ValueError("`images` is required: an image, or a list of images")
        single = _is_image(images)
        image_list = [images] if single else images
        if not isinstance(image_list, (list, tuple)) or not image_list:
            raise ValueError(f"`images` must be an image or a non-empty list of images, got {type(images).__name__}")
        for k, image in enumerate(image_list):
            if not _is_image(image):
                raise ValueError(f"`images`[{k}] is not an image (PIL image, array, path or URL): {type(image).__name__}")
        n = len(image_list)
        if isinstance(text, str):
            texts = [text] * n
        elif isinstance(text, (list, tuple)) and not single and len(text) == n and all(isinstance(t, str) for t in text):
            texts = list(text)
        else:
            raise ValueError(
                f"`text` must be a question (str) or one question per image ({n}), got "
                f"{type(text).__name__}{f' of length {len(text)}' if isinstance(text, (list, tuple)) else ''}"
            )
        if single:
            box_lists = [_box_list(boxes, "boxes")]
        elif boxes is None:
            box_lists = [[] for _ in range(n)]
        elif isinstance(boxes, (list, tuple)) and len(boxes) == n:
            box_lists = [_box_list(b, f"boxes[{k}]") for k, b in enumerate(boxes)]
        else:
            raise ValueError(f"`boxes` must hold one list of boxes per image ({n}) for a batch, got {boxes!r}")
        inputs = [{"image": i, "text": t, "boxes": b} for i, t, b in zip(image_list, texts, box_lists)]
        outputs = super().__call__(inputs, **kwargs)
        return outputs[0] if single else outputs

    def preprocess(self, inputs, timeout=None):
        image = load_image(inputs["image"], timeout=timeout)
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": inputs["text"]}]}]
        prompt = self.processor.apply_chat_template(messages, add_generation_prompt=True)
        use_sam = getattr(self.model, "sam", None) is not None and self.processor.image_processor.sam_image_size is not None
        model_inputs = self.processor(
            images=image, text=prompt, boxes=inputs["boxes"] or None, return_sam_pixel_values=use_sam
        )
        if model_inputs["box_inputs"].shape[1] == 0:
            # one empty slot, so that the batch collator pads the boxes of a batch like the text
            model_inputs["box_inputs"] = model_inputs["box_inputs"].new_zeros((1, 1, 4))
            model_inputs["box_inputs_mask"] = model_inputs["box_inputs_mask"].new_zeros((1, 1))
        for name in ("pixel_values", "sam_pixel_values"):
            if name in model_inputs and self.dtype is not None:
                model_inputs[name] = model_inputs[name].to(dtype=self.dtype)
        return model_inputs

    def _forward(self, model_inputs, generate_kwargs=None, threshold=0.0):
        image_sizes = model_inputs.pop("image_sizes")
        generate_kwargs = self._prepare_generate_kwargs(dict(generate_kwargs or {}), return_dict_in_generate=True)
        output = self.model.generate(**model_inputs, **generate_kwargs)
        results = self.processor.post_process_generation(output, image_sizes=image_sizes, mask_threshold=threshold)
        per_input = len(results) // len(image_sizes)
        grouped = [results[k * per_input : (k + 1) * per_input] for k in range(len(image_sizes))]
        return {"results": grouped}

    def postprocess(self, model_outputs):
        results = model_outputs["results"]
        if results and isinstance(results[0], list):  # one input per forward: not unbatched by the iterator
            results = results[0]
        return results[0] if len(results) == 1 else results


__all__ = ["CUSTOM_PIPELINES", "NextChatGroundingPipeline", "TASK"]
