"""Image processor of NExT-Chat: image inputs to RGB, the CLIP input and the SAM input.

Everything here is plain PIL + numpy (the CLIP branch is transformers' `CLIPImageProcessorPil`) so that the pixel
values never depend on which optional backend (torchvision or not) happens to be installed. The frames and their conversions live in ``geometry_nextchat``.
"""

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import PIL.Image
import torch
from transformers.feature_extraction_utils import BatchFeature
from transformers.image_processing_utils import BaseImageProcessor
from transformers.processing_utils import ImagesKwargs

from .geometry_nextchat import expand2square, sam_padding


OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
SAM_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM_PIXEL_STD = (58.395, 57.12, 57.375)


# --------------------------------------------------------------------------------------------------------------
# Image input normalisation
# --------------------------------------------------------------------------------------------------------------


def _is_image_like(obj) -> bool:
    return isinstance(obj, (PIL.Image.Image, np.ndarray, str, os.PathLike)) or torch.is_tensor(obj)


def _composite_on_white(image: PIL.Image.Image) -> PIL.Image.Image:
    rgba = image.convert("RGBA")
    background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return PIL.Image.alpha_composite(background, rgba).convert("RGB")


def _array_to_uint8(arr: np.ndarray, argument_name: str) -> np.ndarray:
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if np.issubdtype(arr.dtype, np.floating):
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"`{argument_name}` contains NaN or infinite pixel values")
        if arr.size and (arr.min() < -1e-6 or arr.max() > 1 + 1e-6):
            raise ValueError(
                f"`{argument_name}`: float images must have values in [0, 1] (got range "
                f"[{float(arr.min()):.4g}, {float(arr.max()):.4g}]); pass uint8 images for the 0-255 scale"
            )
        return np.round(np.clip(arr.astype(np.float64), 0, 1) * 255).astype(np.uint8)
    if arr.dtype == np.uint16:
        return np.round(arr.astype(np.float64) / 257.0).astype(np.uint8)
    if np.issubdtype(arr.dtype, np.integer):
        if arr.size and (arr.min() < 0 or arr.max() > 255):
            raise ValueError(
                f"`{argument_name}`: integer images of dtype {arr.dtype} must have values in [0, 255] "
                "(use uint16 for 16-bit images)"
            )
        return arr.astype(np.uint8)
    raise ValueError(f"`{argument_name}`: unsupported pixel dtype {arr.dtype}")


def _array_to_pil(arr: np.ndarray, channels_first: bool | None, argument_name: str) -> PIL.Image.Image:
    if arr.ndim == 3:
        first, last = arr.shape[0] in (1, 2, 3, 4), arr.shape[-1] in (1, 2, 3, 4)
        if channels_first is None:
            if first and last:
                raise AssertionError("ambiguous layout must be resolved by the caller")
            if not first and not last:
                raise ValueError(
                    f"`{argument_name}`: cannot find the channel axis of an image of shape {arr.shape} "
                    "(expected 1, 2, 3 or 4 channels first or last)"
                )
            channels_first = first
        if channels_first:
            if not first:
                raise ValueError(f"`{argument_name}`: shape {arr.shape} has no 1-4 channels first")
            arr = np.moveaxis(arr, 0, -1)
        elif not last:
            raise ValueError(f"`{argument_name}`: shape {arr.shape} has no 1-4 channels last")
    elif arr.ndim != 2:
        raise ValueError(f"`{argument_name}`: an image must be 2-D or 3-D, got shape {arr.shape}")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise ValueError(f"`{argument_name}`: empty image of shape {arr.shape}")
    arr = _array_to_uint8(np.ascontiguousarray(arr), argument_name)
    if arr.ndim == 2:
        return PIL.Image.fromarray(arr, mode="L").convert("RGB")
    channels = arr.shape[-1]
    if channels == 1:
        return PIL.Image.fromarray(arr[..., 0], mode="L").convert("RGB")
    if channels == 2:
        return _composite_on_white(PIL.Image.fromarray(arr, mode="LA"))
    if channels == 3:
        return PIL.Image.fromarray(arr, mode="RGB")
    return _composite_on_white(PIL.Image.fromarray(arr, mode="RGBA"))


def to_rgb_image(image, input_data_format: str | None = None, argument_name: str = "images") -> PIL.Image.Image:
    """Convert any supported image input to an 8-bit RGB PIL image.

    * PIL images of every mode: ``RGB`` as is; ``RGBA``/``LA``/``La``/``RGBa``/``PA`` and ``P`` with transparency
      are composited on white; ``I;16*`` are scaled by 1/257; ``I`` (32-bit) is taken as 8-bit when its values
      fit in 0..255 and as 16-bit otherwise; ``F`` is taken as [0, 1] when its maximum is at most 1, else as
      0..255 (clipped); every other mode (``L``, ``1``, ``P``, ``CMYK``, ``YCbCr``, ``LAB``, ``HSV``) goes through
      ``PIL.Image.convert("RGB")``.
    * numpy arrays / torch tensors: 2-D (grey) or 3-D with 1-4 channels. The channel axis is inferred; where both
      ends could be channels (e.g. ``(3, 5, 3)`` or ``(1, 1, 3)``), numpy arrays are read channels-last (the PIL
      convention) and torch tensors channels-first (the torchvision convention); pass
      ``input_data_format="channels_first" | "channels_last"`` to decide. uint8 is 0-255, uint16 is 16-bit, bool
      is {0, 255}, floats must lie in [0, 1]; 2 or 4 channels carry alpha and are composited on white.
    * ``str`` / ``os.PathLike``: a local image file.
    """
    if isinstance(image, (str, os.PathLike)):
        try:
            with PIL.Image.open(image) as opened:
                opened.load()
                image = opened.copy()
        except (OSError, ValueError) as err:
            raise ValueError(f"`{argument_name}`: cannot open image file {image!r}: {err}") from err
    if isinstance(image, PIL.Image.Image):
        if image.width == 0 or image.height == 0:
            raise ValueError(f"`{argument_name}`: empty image of size {image.size}")
        mode = image.mode
        if mode == "RGB":
            return image
        if mode.startswith("I;16"):
            arr = np.asarray(image).astype(np.float64) / 257.0
            return PIL.Image.fromarray(np.round(arr).astype(np.uint8), mode="L").convert("RGB")
        if mode == "I":
            arr = np.asarray(image).astype(np.int64)
            if arr.size and (arr.min() < 0 or arr.max() > 65535):
                raise ValueError(f"`{argument_name}`: mode 'I' image with values outside 0..65535")
            if arr.size and arr.max() > 255:
                arr = np.round(arr / 257.0)
            return PIL.Image.fromarray(arr.astype(np.uint8), mode="L").convert("RGB")
        if mode == "F":
            arr = np.asarray(image).astype(np.float64)
            if not np.all(np.isfinite(arr)):
                raise ValueError(f"`{argument_name}`: mode 'F' image contains NaN or infinite values")
            arr = arr * 255.0 if arr.size and arr.max() <= 1.0 else arr
            return PIL.Image.fromarray(np.round(np.clip(arr, 0, 255)).astype(np.uint8), mode="L").convert("RGB")
        if mode in ("RGBA", "LA", "La", "RGBa", "PA") or (mode == "P" and "transparency" in image.info):
            return _composite_on_white(image)
        try:
            return image.convert("RGB")
        except (ValueError, OSError) as err:
            raise ValueError(f"`{argument_name}`: cannot convert a PIL image of mode {mode!r} to RGB") from err
    if torch.is_tensor(image):
        tensor = image.detach().to("cpu")
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.float()
        arr = tensor.numpy()
        default_first = True
    elif isinstance(image, np.ndarray):
        arr = image
        default_first = False
    else:
        raise ValueError(
            f"`{argument_name}`: expected a PIL image, a numpy array, a torch tensor or a file path, "
            f"got {type(image).__name__}"
        )
    if input_data_format not in (None, "channels_first", "channels_last"):
        raise ValueError(
            f"`input_data_format` must be None, 'channels_first' or 'channels_last', got {input_data_format!r}"
        )
    channels_first = None if input_data_format is None else input_data_format == "channels_first"
    if channels_first is None and arr.ndim == 3:
        first, last = arr.shape[0] in (1, 2, 3, 4), arr.shape[-1] in (1, 2, 3, 4)
        if first and last:
            channels_first = default_first
    return _array_to_pil(arr, channels_first, argument_name)


def flatten_images(images, argument_name: str = "images") -> list:
    """A single image, a list of images or a 4-D array/tensor -> flat list of single images."""
    if images is None:
        return []
    if _is_image_like(images):
        if isinstance(images, np.ndarray) and images.ndim == 4:
            return list(images)
        if torch.is_tensor(images) and images.ndim == 4:
            return list(images.unbind(0))
        return [images]
    if isinstance(images, (list, tuple)):
        out = []
        for item in images:
            if not _is_image_like(item):
                raise ValueError(
                    f"`{argument_name}` must be an image or a list of images, found an element of type "
                    f"{type(item).__name__}"
                )
            out.extend(flatten_images(item, argument_name))
        return out
    raise ValueError(f"`{argument_name}` must be an image or a list of images, got {type(images).__name__}")


# --------------------------------------------------------------------------------------------------------------
# The image processor
# --------------------------------------------------------------------------------------------------------------


class NextChatImagesKwargs(ImagesKwargs, total=False):
    """The per-call options of :class:`NextChatImageProcessor` (and ``images_kwargs`` of
    :class:`NextChatProcessor`): transformers' ``ImagesKwargs`` plus the NExT-Chat ones below. Every field of the
    image processor's configuration can be overridden for one call.

    do_pad_to_square (`bool`): pad to a centred square (``expand2square``) before the CLIP branch.
    pad_color (`list[int]`): RGB colour of that padding (white in the original).
    sam_image_size (`int` or `None`): side of the SAM input.
    sam_pixel_mean, sam_pixel_std (`list[float]`): SAM normalisation on the 0-255 scale.
    sam_resample (`int`): PIL filter of the SAM resize.
    return_sam_pixel_values (`bool`): return ``sam_pixel_values`` (defaults to whether SAM is configured).
    """

    do_pad_to_square: bool | None
    pad_color: list[int] | tuple[int, ...] | None
    sam_image_size: int | None
    sam_pixel_mean: list[float] | tuple[float, ...] | None
    sam_pixel_std: list[float] | tuple[float, ...] | None
    sam_resample: int | None
    return_sam_pixel_values: bool | None


def _size_dict(size, name):
    if isinstance(size, int):
        return {"shortest_edge": size} if name == "size" else {"height": size, "width": size}
    if isinstance(size, dict):
        return {k: int(v) for k, v in size.items()}
    if isinstance(size, (list, tuple)) and len(size) == 2:
        return {"height": int(size[0]), "width": int(size[1])}
    raise ValueError(f"`{name}` must be an int or a dict, got {size!r}")


class NextChatImageProcessor(BaseImageProcessor):
    r"""
    Image processor of NExT-Chat. For each image it returns

    * ``pixel_values`` (CLIP input): the RGB image padded to a centred square (``pad_color``, white like the
      original ``Expand2square``), resized so that its shortest edge is ``size["shortest_edge"]`` (PIL, bicubic),
      centre-cropped to ``crop_size``, rescaled by ``rescale_factor`` and normalised with ``image_mean`` /
      ``image_std`` (the arithmetic of transformers 4.31's ``CLIPImageProcessor``, implemented here with PIL and
      numpy so that it does not drift with the installed backend);
    * ``sam_pixel_values`` (when ``sam_image_size`` is set and ``return_sam_pixel_values``): the original image
      resized so that its longest side is ``sam_image_size`` (PIL bilinear), normalised with ``sam_pixel_mean`` /
      ``sam_pixel_std`` on the 0-255 scale, and zero-padded (after normalisation) to a centred square;
    * ``image_sizes``: the original ``(height, width)``.

    Defaults are those of CLIP ViT-L/14-336 and SAM (1024). ``sam_image_size=None`` makes a box-only processor.
    See :func:`to_rgb_image` for the accepted inputs.
    """

    model_input_names = ["pixel_values", "sam_pixel_values", "image_sizes"]
    valid_kwargs = NextChatImagesKwargs

    # the fields a CLIPImageProcessor config shares with this one
    _CLIP_FIELDS = (
        "do_resize",
        "size",
        "resample",
        "do_center_crop",
        "crop_size",
        "do_rescale",
        "rescale_factor",
        "do_normalize",
        "image_mean",
        "image_std",
    )
    _FIELDS = (
        "do_pad_to_square",
        "pad_color",
        *_CLIP_FIELDS,
        "sam_image_size",
        "sam_pixel_mean",
        "sam_pixel_std",
        "sam_resample",
    )

    def __init__(
        self,
        do_pad_to_square: bool = True,
        pad_color: Sequence[int] = (255, 255, 255),
        do_resize: bool = True,
        size: dict | int | None = None,
        resample: int = 3,
        do_center_crop: bool = True,
        crop_size: dict | int | None = None,
        do_rescale: bool = True,
        rescale_factor: float = 1 / 255,
        do_normalize: bool = True,
        image_mean: Sequence[float] = OPENAI_CLIP_MEAN,
        image_std: Sequence[float] = OPENAI_CLIP_STD,
        sam_image_size: int | None = 1024,
        sam_pixel_mean: Sequence[float] = SAM_PIXEL_MEAN,
        sam_pixel_std: Sequence[float] = SAM_PIXEL_STD,
        sam_resample: int = 2,
        **kwargs,
    ):
        # keys written by other processors / older versions that carry no meaning here
        for key in ("image_processor_type", "processor_class", "do_convert_rgb", "auto_map", "_processor_class"):
            kwargs.pop(key, None)
        if kwargs:
            raise ValueError(f"NextChatImageProcessor got unknown arguments {sorted(kwargs)}")
        super().__init__()
        self.do_pad_to_square = bool(do_pad_to_square)
        self.pad_color = [int(c) for c in pad_color]
        if len(self.pad_color) != 3 or not all(0 <= c <= 255 for c in self.pad_color):
            raise ValueError(f"`pad_color` must be three ints in 0..255, got {pad_color!r}")
        self.do_resize = bool(do_resize)
        self.size = _size_dict(size if size is not None else {"shortest_edge": 336}, "size")
        if self.do_resize and not (
            "shortest_edge" in self.size or ("height" in self.size and "width" in self.size)
        ):
            raise ValueError(f"`size` needs 'shortest_edge' or 'height' and 'width', got {self.size}")
        self.resample = int(resample)
        self.do_center_crop = bool(do_center_crop)
        self.crop_size = _size_dict(crop_size if crop_size is not None else {"height": 336, "width": 336}, "crop_size")
        self.do_rescale = bool(do_rescale)
        self.rescale_factor = float(rescale_factor)
        self.do_normalize = bool(do_normalize)
        # ImagesKwargs allows one float for all channels
        self.image_mean = [float(v) for v in ([image_mean] * 3 if isinstance(image_mean, (int, float)) else image_mean)]
        self.image_std = [float(v) for v in ([image_std] * 3 if isinstance(image_std, (int, float)) else image_std)]
        if sam_image_size is not None and int(sam_image_size) <= 0:
            raise ValueError(f"`sam_image_size` must be a positive int or None, got {sam_image_size!r}")
        self.sam_image_size = None if sam_image_size is None else int(sam_image_size)
        if self.sam_image_size is None:  # what `preprocess` returns by default
            self.model_input_names = ["pixel_values", "image_sizes"]
        self.sam_pixel_mean = [float(v) for v in sam_pixel_mean]
        self.sam_pixel_std = [float(v) for v in sam_pixel_std]
        self.sam_resample = int(sam_resample)
        for name in ("image_mean", "image_std", "sam_pixel_mean", "sam_pixel_std"):
            if len(getattr(self, name)) != 3:
                raise ValueError(f"`{name}` must have 3 values, got {getattr(self, name)}")

    # -- (de)serialisation ------------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        out = {name: getattr(self, name) for name in self._FIELDS}
        out["image_processor_type"] = type(self).__name__
        if getattr(self, "_auto_class", None) is not None and "auto_map" in self.__dict__:
            out["auto_map"] = self.__dict__["auto_map"]
        return out

    @classmethod
    def from_clip_image_processor_dict(cls, clip_dict: dict, **kwargs) -> "NextChatImageProcessor":
        """Build from a ``CLIPImageProcessor`` ``preprocessor_config.json`` dict (the vision tower's), keeping
        its sizes, resampling, mean and std; ``kwargs`` (e.g. ``sam_image_size``) override."""
        fields = {key: clip_dict[key] for key in cls._CLIP_FIELDS if clip_dict.get(key) is not None}
        fields.update(kwargs)
        return cls(**fields)

    @property
    def crop_height_width(self) -> tuple[int, int]:
        """Size ``(H, W)`` of ``pixel_values``."""
        if self.do_center_crop:
            return self.crop_size["height"], self.crop_size["width"]
        if "shortest_edge" in self.size:
            return self.size["shortest_edge"], self.size["shortest_edge"]
        return self.size["height"], self.size["width"]

    # -- the two branches -------------------------------------------------------------------------------------

    def _clip_processor(self):
        """transformers' CLIP image processor (PIL backend) with this processor's CLIP fields: the CLIP branch is
        CLIP's own arithmetic, applied to the padded square."""
        from transformers import CLIPImageProcessorPil

        return CLIPImageProcessorPil(**{name: getattr(self, name) for name in self._CLIP_FIELDS})

    def _clip_branch(self, images: list[PIL.Image.Image]) -> np.ndarray:
        if self.do_pad_to_square:
            images = [expand2square(image, self.pad_color) for image in images]
        return self._clip_processor()(images, return_tensors="np")["pixel_values"].astype(np.float32)

    def _sam_branch(self, image: PIL.Image.Image) -> np.ndarray:
        size = self.sam_image_size
        pad_top, pad_left, new_h, new_w = sam_padding((image.height, image.width), size)
        if (new_w, new_h) != image.size:
            image = image.resize((new_w, new_h), resample=self.sam_resample)
        arr = np.asarray(image).astype(np.float32)
        mean = np.asarray(self.sam_pixel_mean, dtype=np.float32)
        std = np.asarray(self.sam_pixel_std, dtype=np.float32)
        arr = (arr - mean) / std
        out = np.zeros((3, size, size), dtype=np.float32)
        out[:, pad_top : pad_top + new_h, pad_left : pad_left + new_w] = arr.transpose(2, 0, 1)
        return out

    # ImagesKwargs fields that have no meaning here: accepted only at their neutral value
    _NEUTRAL_IMAGES_KWARGS = {
        "do_convert_rgb": (None, True),
        "default_to_square": (None,),
        "do_pad": (None, False),
        "pad_size": (None,),
        "disable_grouping": (None,),
        "image_seq_length": (None,),
        "data_format": (None, "channels_first"),
        "device": (None, "cpu"),
    }

    def with_overrides(self, **overrides) -> "NextChatImageProcessor":
        """This image processor, or a copy with some configuration fields changed (validated as in ``__init__``)."""
        unknown = sorted(set(overrides) - set(self._FIELDS))
        if unknown:
            raise ValueError(f"NextChatImageProcessor: unknown configuration field(s) {unknown}")
        if not overrides:
            return self
        fields = {name: getattr(self, name) for name in self._FIELDS}
        fields.update(overrides)
        return type(self)(**fields)

    def preprocess(
        self,
        images,
        return_sam_pixel_values: bool | None = None,
        input_data_format: str | None = None,
        return_tensors: str | None = "pt",
        **kwargs,
    ) -> BatchFeature:
        """Process one image or a list of images. Returns ``pixel_values`` (n, 3, H, W), ``image_sizes`` (n, 2)
        (original height, width) and, with SAM, ``sam_pixel_values`` (n, 3, S, S).

        Every configuration field (``do_resize``, ``size``, ``resample``, ``do_center_crop``, ``crop_size``,
        ``do_rescale``, ``rescale_factor``, ``do_normalize``, ``image_mean``, ``image_std``, ``do_pad_to_square``,
        ``pad_color``, ``sam_image_size``, ``sam_pixel_mean``, ``sam_pixel_std``, ``sam_resample``) may be passed
        to override it for this call (see :class:`NextChatImagesKwargs`); ``None`` keeps the configured value."""
        overrides = {}
        for key, value in kwargs.items():
            if key in self._NEUTRAL_IMAGES_KWARGS:
                neutral = self._NEUTRAL_IMAGES_KWARGS[key]
                shown = str(getattr(value, "value", value)) if key in ("data_format", "device") else value
                if value is not None and shown not in neutral:
                    raise ValueError(
                        f"NextChatImageProcessor does not support `{key}`={value!r} (accepted: "
                        f"{', '.join(repr(v) for v in neutral)}); it works on the CPU with PIL and numpy, returns "
                        "channels-first RGB and pads with `do_pad_to_square`"
                    )
            elif key in self._FIELDS:
                if value is not None:
                    overrides[key] = value
            else:
                raise ValueError(f"NextChatImageProcessor.preprocess got unknown arguments {[key]}")
        processor = self.with_overrides(**overrides)
        if return_sam_pixel_values is None:
            return_sam_pixel_values = processor.sam_image_size is not None
        if return_sam_pixel_values and processor.sam_image_size is None:
            raise ValueError("`return_sam_pixel_values=True` but this image processor has no `sam_image_size`")
        if return_tensors not in (None, "np", "pt"):
            raise ValueError(f"`return_tensors` must be 'pt', 'np' or None, got {return_tensors!r}")
        flat = flatten_images(images, "images")
        if not flat:
            raise ValueError("`images` is empty")
        rgb = [to_rgb_image(img, input_data_format, "images") for img in flat]
        pixel_values = processor._clip_branch(rgb)
        data = {
            "pixel_values": pixel_values,
            "image_sizes": np.array([[img.height, img.width] for img in rgb], dtype=np.int64),
        }
        if return_sam_pixel_values:
            data["sam_pixel_values"] = np.stack([processor._sam_branch(img) for img in rgb])
        return BatchFeature(data=data, tensor_type="pt" if return_tensors == "pt" else None)

    def __call__(self, images, **kwargs) -> BatchFeature:
        return self.preprocess(images, **kwargs)


__all__ = [
    "NextChatImageProcessor",
    "NextChatImagesKwargs",
    "flatten_images",
    "to_rgb_image",
]
