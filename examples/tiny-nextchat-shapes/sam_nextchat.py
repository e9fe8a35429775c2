"""SAM for NExT-Chat: segment-anything's modules, prompted with trigger tokens plus a box.

NExT-Chat prompts SAM's mask decoder with `num_seg_prompt_tokens` sparse tokens computed from the hidden state of
a trigger (`seg_prompt_mlp`) followed by the two corner tokens of the predicted box, the dense prompt being the
"no mask" embedding, and keeps the single-mask output.
"""

import math
from functools import partial

import torch
from torch import nn


try:
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, TwoWayTransformer
except ImportError as error:  # segment-anything also needs torchvision
    raise ImportError(
        "NExT-Chat builds SAM from the `segment-anything` package, which could not be imported "
        f"({error}). Install it with `pip install segment-anything torchvision`."
    ) from error


class NextChatSamModel(nn.Module):
    """SAM's image encoder, prompt encoder and mask decoder, sized by `NextChatConfig.sam_config`.

    Parameter names are those of the official SAM checkpoint (`image_encoder.*`, `prompt_encoder.*`,
    `mask_decoder.*`). Normalisation and padding happen in the processor, so `pixel_mean`/`pixel_std` are absent.
    """

    def __init__(self, sam_config: dict):
        super().__init__()
        image_size = sam_config["image_size"]
        prompt_dim = sam_config["prompt_embed_dim"]
        self.image_size = image_size
        self.image_embedding_size = image_size // sam_config["patch_size"]
        self.image_encoder = ImageEncoderViT(
            depth=sam_config["encoder_depth"],
            embed_dim=sam_config["encoder_embed_dim"],
            img_size=image_size,
            mlp_ratio=4,
            norm_layer=partial(nn.LayerNorm, eps=1e-6),
            num_heads=sam_config["encoder_num_heads"],
            patch_size=sam_config["patch_size"],
            qkv_bias=True,
            use_rel_pos=True,
            global_attn_indexes=tuple(sam_config["encoder_global_attn_indexes"]),
            window_size=sam_config["window_size"],
            out_chans=prompt_dim,
        )
        self.prompt_encoder = PromptEncoder(
            embed_dim=prompt_dim,
            image_embedding_size=(self.image_embedding_size, self.image_embedding_size),
            input_image_size=(image_size, image_size),
            mask_in_chans=16,
        )
        self.mask_decoder = MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=2048, num_heads=8),
            transformer_dim=prompt_dim,
            iou_head_depth=3,
            iou_head_hidden_dim=256,
        )

    def _positional_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """SAM's random-Fourier encoding of coordinates in [0, 1], computed in float32 whatever the weight dtype."""
        gaussian = self.prompt_encoder.pe_layer.positional_encoding_gaussian_matrix.float()
        projected = 2 * math.pi * ((2 * coords.float() - 1) @ gaussian)
        return torch.cat([torch.sin(projected), torch.cos(projected)], dim=-1)

    def image_positional_embeddings(self) -> torch.Tensor:
        """Dense positional encoding of the image-embedding grid, `(1, prompt_dim, h, w)`."""
        size = self.image_embedding_size
        centres = (torch.arange(size, device=self.prompt_encoder.no_mask_embed.weight.device) + 0.5) / size
        grid = torch.stack(torch.meshgrid(centres, centres, indexing="xy"), dim=-1)  # (h, w, 2) as (x, y)
        return self._positional_encoding(grid).permute(2, 0, 1).unsqueeze(0)

    def embed_boxes(self, boxes: torch.Tensor) -> torch.Tensor:
        """Corner tokens of xyxy boxes given in SAM input pixels, `(K, 4)` -> `(K, 2, prompt_dim)`."""
        corners = (boxes.float() + 0.5).reshape(-1, 2, 2) / self.image_size
        embedding = self._positional_encoding(corners)
        weights = self.prompt_encoder.point_embeddings
        return embedding + torch.stack([weights[2].weight[0], weights[3].weight[0]]).float()

    def get_image_embeddings(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(n, 3, S, S)` normalised, padded images -> `(n, prompt_dim, S/patch, S/patch)`."""
        return self.image_encoder(pixel_values)

    def decode_masks(
        self, image_embeddings: torch.Tensor, prompt_tokens: torch.Tensor, boxes: torch.Tensor,
        image_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks of K prompts, each on its own image, in one pass of the mask decoder.

        segment-anything's `MaskDecoder.predict_masks` repeats ONE image embedding for all its prompts; this is the
        same computation with each prompt's image embedding gathered by `image_index`, so that the prompts of a
        whole batch of images share one pass instead of one pass per image. Only the single-mask output is
        decoded (`multimask_output=False`); the three multimask hypernetworks are not run.

        Args:
            image_embeddings: `(n, prompt_dim, h, w)` from `get_image_embeddings`.
            prompt_tokens: `(K, num_seg_prompt_tokens, prompt_dim)` from `seg_prompt_mlp`.
            boxes: `(K, 4)` xyxy in SAM input pixels (normalised box × `image_size`).
            image_index: `(K,)` the row of `image_embeddings` of each prompt; default all 0 (one image).

        Returns:
            low-resolution mask logits `(K, 4h, 4w)` and predicted IoU `(K,)`.
        """
        decoder = self.mask_decoder
        dtype = image_embeddings.dtype
        num_prompts = prompt_tokens.shape[0]
        if image_index is None:
            image_index = torch.zeros(num_prompts, dtype=torch.long, device=image_embeddings.device)
        sparse = torch.cat([prompt_tokens.to(dtype), self.embed_boxes(boxes).to(dtype)], dim=1)
        output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
        tokens = torch.cat((output_tokens.unsqueeze(0).expand(num_prompts, -1, -1), sparse), dim=1)
        dense = self.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).to(dtype)
        # index_select, not advanced indexing: on a multi-threaded CPU the backward of `embeddings[index]` (an
        # accumulating index_put) adds up in an order that changes from run to run, and so would a training run;
        # index_select's backward does not
        src = torch.index_select(image_embeddings, 0, image_index.to(image_embeddings.device)) + dense
        pos_src = self.image_positional_embeddings().to(dtype).expand(num_prompts, -1, -1, -1)
        batch, channels, height, width = src.shape
        hidden, src = decoder.transformer(src, pos_src, tokens)
        iou = decoder.iou_prediction_head(hidden[:, 0, :])
        upscaled = decoder.output_upscaling(src.transpose(1, 2).view(batch, channels, height, width))
        hyper_in = decoder.output_hypernetworks_mlps[0](hidden[:, 1, :]).unsqueeze(1)  # the single-mask token
        masks = hyper_in @ upscaled.flatten(2)
        return masks.view(batch, upscaled.shape[-2], upscaled.shape[-1]), iou[:, 0]

    def predict_masks(
        self, pixel_values: torch.Tensor, prompt_tokens: torch.Tensor, boxes: torch.Tensor, image_index: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Masks of K prompts over a batch of images; the image encoder runs once per distinct image and the mask
        decoder once for all prompts.

        Args:
            pixel_values: `(B, 3, S, S)` SAM inputs.
            prompt_tokens: `(K, num_seg_prompt_tokens, prompt_dim)`.
            boxes: `(K, 4)` normalised xyxy boxes (SAM frame).
            image_index: `(K,)` which row of `pixel_values` each prompt belongs to.

        Returns:
            low-resolution mask logits `(K, 4h, 4w)` and predicted IoUs `(K,)`.
        """
        dtype = self.mask_decoder.iou_token.weight.dtype
        images, inverse = torch.unique(image_index, return_inverse=True)
        embeddings = self.get_image_embeddings(pixel_values[images.to(pixel_values.device)].to(dtype))
        return self.decode_masks(embeddings, prompt_tokens, boxes * self.image_size, inverse)
