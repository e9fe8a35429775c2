"""Keep a frozen vision tower's features of each image, so that later epochs do not compute them again.

In the shapes recipe's phase 1 (stage "stage2"), CLIP is frozen and every training image is read four times; the
tower's forward is about a tenth of a step. :class:`VisionFeatureCache` replaces the tower's ``forward`` (on the
instance: the module, its weights and its state dict are untouched) with one that computes the hidden states of
the images it has not seen and stacks the kept ones for the others. An image is known by the bytes of its pixel
values, so a batch may hold any mix of seen and unseen images, in any order.

Only the hidden-state layers that `NextChatModel.get_image_features` asks for (``output_hidden_states`` as a
list of layer indices) are kept; any other call (every hidden state) runs the tower itself. The tower's attentions
are neither computed nor returned (`image_outputs.attentions` is None): a training objective that asks the model
for attentions (`AttentionSupervision`) wants the language model's, and a frozen tower's have no use in training.
"""

from __future__ import annotations

import hashlib

import torch
from transformers.modeling_outputs import BaseModelOutputWithPooling


def image_key(pixel_values: torch.Tensor) -> bytes:
    """A digest of one image's pixel values `(3, H, W)` (and of its shape and dtype)."""
    values = pixel_values.detach().contiguous().cpu()
    digest = hashlib.blake2b(values.flatten().view(torch.uint8).numpy().tobytes(), digest_size=16)
    digest.update(repr((tuple(values.shape), str(values.dtype))).encode())
    return digest.digest()


class VisionFeatureCache:
    """Attached to a frozen vision tower (`attach`), its ``forward`` computes each distinct image once.

    Args:
        tower (`nn.Module`): the vision tower (`model.model.vision_tower`); every parameter must be frozen and no
            dropout active, since the kept features stand for what the tower would compute again.

    Attributes:
        store (`dict`): image key -> `{layer: (num_patches, hidden_size) tensor}`.
        computed (`int`): how many images the tower has run on.
    """

    def __init__(self, tower: torch.nn.Module):
        trainable = [name for name, p in tower.named_parameters() if p.requires_grad]
        if trainable:
            raise ValueError(
                f"VisionFeatureCache needs a frozen vision tower; these parameters train: {trainable[:3]}"
                f"{' ...' if len(trainable) > 3 else ''}"
            )
        dropout = [name for name, m in tower.named_modules() if isinstance(m, torch.nn.Dropout) and m.p > 0]
        if dropout or getattr(tower.config, "attention_dropout", 0.0) or getattr(tower.config, "dropout", 0.0):
            raise ValueError("VisionFeatureCache needs a vision tower without dropout: its features must not vary")
        self.tower = tower
        self.num_layers = tower.config.num_hidden_layers
        self.store: dict[bytes, dict[int, torch.Tensor]] = {}
        self.computed = 0
        self._forward = tower.forward

    def attach(self) -> VisionFeatureCache:
        """The tower's calls go through the cache from now on."""
        self.tower.forward = self
        return self

    def detach(self) -> None:
        """The tower runs itself again (the kept features stay in `store`)."""
        if vars(self.tower).get("forward") is self:
            del self.tower.forward  # the class's forward again

    def __call__(self, pixel_values, output_hidden_states=None, return_dict=True, output_attentions=None, **kwargs):
        layers = output_hidden_states
        if kwargs or not isinstance(layers, (list, tuple)) or not return_dict:
            return self._forward(pixel_values, output_hidden_states=output_hidden_states, return_dict=return_dict,
                                 output_attentions=output_attentions, **kwargs)
        keys = [image_key(image) for image in pixel_values]
        missing = {}
        for i, key in enumerate(keys):
            kept = self.store.get(key, {})
            if key not in missing and any(layer not in kept for layer in layers):
                missing[key] = i
        if missing:
            rows = list(missing.values())
            with torch.no_grad():
                out = self._forward(pixel_values[rows], output_hidden_states=list(layers), return_dict=True)
            for j, key in enumerate(missing):
                self.store.setdefault(key, {}).update({layer: out.hidden_states[layer][j].clone() for layer in layers})
            self.computed += len(rows)
        hidden_states = [None] * (self.num_layers + 1)
        for layer in layers:
            hidden_states[layer] = torch.stack([self.store[key][layer] for key in keys])
        return BaseModelOutputWithPooling(hidden_states=tuple(hidden_states))
