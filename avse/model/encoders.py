"""Image and text encoders: backbone tokens -> projection -> GPO pooling -> embedding.

Image: the backbone's patch tokens are split into `views` partial views by radial bias
sampling; each view is projected and pooled on its own and L2-normalised, and the views
are concatenated: `[B, views * embed_size]`. Text: BERT token features -> dropout -> linear
+ a 2-layer MLP residual -> GPO -> LayerNorm: `[B, embed_size]`.
"""

from __future__ import annotations

import math
import types

import torch
from torch import Tensor, nn
from transformers import PreTrainedModel

from avse.errors import ConfigError, DataError
from avse.model.pooling import GPO, random_token_drop
from avse.model.sampling import gather_views, keep_count, radial_bias_indices, view_centres

# ImageNet mean and std of RGB in [0, 1]: Swin's, and the official AVSE code's for every backbone.
IMAGENET_STATS = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
# Pixel normalisation each backbone family was pretrained with (`model.pixel_stats: backbone`).
PIXEL_STATS = {
    "vit": ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5)),
    "swin": IMAGENET_STATS,
}


class MLP(nn.Module):
    """Linear layers with a norm and ReLU between them (VSE-infinity's residual MLP).

    `norm: layer` normalises each token; `batch` (VSE-infinity's and the official AVSE
    code's choice) normalises each feature over all tokens of the batch, padding included.
    """

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, layers: int = 2, norm: str = "layer"):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (layers - 1) + [out_dim]
        blocks: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
            blocks.append(nn.Linear(a, b))
            if i < layers - 1:
                blocks += [nn.LayerNorm(b) if norm == "layer" else nn.BatchNorm1d(b), nn.ReLU()]
        self.net = nn.Sequential(*blocks)

    def forward(self, x: Tensor) -> Tensor:
        """`[..., in_dim]` -> `[..., out_dim]`."""
        return self.net(x.reshape(-1, x.size(-1))).view(*x.shape[:-1], -1)


def bicubic_matrix(old: int, new: int, device: torch.device | None = None) -> Tensor:
    """`[new, old]`: PyTorch's bicubic resize (`align_corners=False`) of an axis of `old` values to `new`, as a matrix."""
    basis = torch.eye(old, device=device).view(old, 1, old, 1)  # each input position alone, along the height
    return nn.functional.interpolate(basis, size=(new, 1), mode="bicubic", align_corners=False)[:, 0, :, 0].T


def interpolate_positions(position_embeddings: Tensor, grid_h: int, grid_w: int) -> Tensor:
    """ViT position embeddings `[1, 1 + S * S, D]` of a square grid, resized to `grid_h x grid_w`: `[1, 1 + grid_h * grid_w, D]`.

    transformers' bicubic `interpolate_pos_encoding`, written as the two matrix products it is
    (bicubic resizing is separable): the same values, and a backward pass that is deterministic on
    CUDA, where bicubic upsampling's backward adds partial gradients in varying order.
    """
    cls, patches = position_embeddings[:, :1], position_embeddings[:, 1:]
    side = math.isqrt(patches.size(1))
    rows, cols = (bicubic_matrix(side, n, patches.device).to(patches.dtype) for n in (grid_h, grid_w))
    resized = torch.einsum("hi,wj,ijd->hwd", rows, cols, patches.reshape(side, side, -1))  # [grid_h, grid_w, D]
    return torch.cat([cls, resized.reshape(1, grid_h * grid_w, -1)], dim=1)


def _deterministic_interpolation(embeddings: nn.Module, tokens: Tensor, height: int, width: int) -> Tensor:
    """Replaces `ViTEmbeddings.interpolate_pos_encoding` (same arguments) with :func:`interpolate_positions`."""
    return interpolate_positions(embeddings.position_embeddings, height // embeddings.patch_size, width // embeddings.patch_size)


class ImageEncoder(nn.Module):
    """Multi-view image encoder over a ViT or Swin backbone.

    `view_sampling` (`gumbel | nearest`), `keep_rule` (`patches | tokens`, see
    `sampling.keep_count`) and `pixel_stats` (`backbone | imagenet`) are the parameters
    `model.view_sampling`, `model.keep_count` and `model.pixel_stats`.
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        family: str,
        img_res: int,
        embed_size: int,
        views: int,
        keep_ratio: float,
        eval_keep_ratio: float,
        alpha: float,
        size_augment: bool,
        final_norm: bool = True,
        view_sampling: str = "gumbel",
        keep_rule: str = "patches",
        pixel_stats: str = "backbone",
    ):
        super().__init__()
        if not final_norm and family != "vit":
            raise ConfigError("model.vision_final_norm: false applies to ViT backbones only (Swin's stages end in their own norm)")
        self.backbone, self.family, self.img_res, self.final_norm = backbone, family, img_res, final_norm
        self.views, self.alpha, self.size_augment = views, alpha, size_augment
        self.keep_ratio, self.eval_keep_ratio = keep_ratio, eval_keep_ratio
        self.view_sampling, self.keep_rule = view_sampling, keep_rule
        config = backbone.config
        if family == "vit":
            self.grid = img_res // config.patch_size
            self.num_prefix = 1  # the class token, kept in every view
            hidden = config.hidden_size
            self.interpolate = img_res != config.image_size
            if self.interpolate:
                backbone.embeddings.interpolate_pos_encoding = types.MethodType(_deterministic_interpolation, backbone.embeddings)
        else:
            # Swin's windows need the full grid: views are sampled from the final stage's tokens.
            self.grid = img_res // config.patch_size // 2 ** (len(config.depths) - 1)
            self.num_prefix = 0
            hidden = backbone.num_features
        mean, std = IMAGENET_STATS if pixel_stats == "imagenet" else PIXEL_STATS[family]
        self.register_buffer("pixel_mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.proj = nn.Linear(hidden, embed_size)
        self.gpo = GPO()

    def unused_parameters(self) -> list[str]:
        """Backbone parameters this configuration never uses: ViT's final LayerNorm when it is skipped."""
        if self.family == "vit" and not self.final_norm:
            return [f"backbone.layernorm.{name}" for name, _ in self.backbone.layernorm.named_parameters()]
        return []

    def normalize_pixels(self, images: Tensor) -> Tensor:
        """uint8 `[B, 3, H, W]` -> normalised float `[B, 3, H, W]`."""
        return (images.float() / 255.0 - self.pixel_mean) / self.pixel_std

    def view_tokens(self, pixels: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Backbone features of every view: `[B * V, n, hidden]` (views of an image consecutive) and the kept patch indices `[B, V, k]`."""
        batch, train, nearest = pixels.size(0), self.training, self.view_sampling == "nearest"
        keep = keep_count(self.keep_ratio if train else self.eval_keep_ratio, self.grid, self.grid, self.keep_rule, self.num_prefix)
        centres = view_centres(batch, self.views, self.grid, self.grid, train=train, at_patches=nearest, generator=generator, device=pixels.device)
        indices = radial_bias_indices(centres, self.grid, self.grid, keep, self.alpha, noise=train and not nearest, generator=generator)  # [B, V, k]
        if self.family == "vit":
            vit = self.backbone
            tokens = vit.embeddings(pixels, interpolate_pos_encoding=self.interpolate)  # [B, 1 + P, hidden]
            hidden = gather_views(tokens, indices, self.num_prefix)  # [B * V, 1 + k, hidden]
            # All views go through the transformer in one batched call.
            for layer in vit.layers:
                hidden = layer(hidden)
            return (vit.layernorm(hidden) if self.final_norm else hidden), indices
        tokens = self.backbone(pixel_values=pixels).last_hidden_state  # [B, P_final, hidden]
        return gather_views(tokens, indices, self.num_prefix), indices  # [B * V, k, hidden]

    def forward(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        """uint8 images `[B, 3, R, R]` -> embeddings `[B, V * embed_size]`, each view's part unit-norm."""
        batch = images.size(0)
        tokens, _ = self.view_tokens(self.normalize_pixels(images), generator)  # [B * V, n, hidden]
        features = self.proj(tokens)  # [B * V, n, E]
        lengths = None  # every view keeps the same number of tokens
        if self.training and self.size_augment:
            full = torch.full((features.size(0),), features.size(1), device=features.device)
            features, lengths = random_token_drop(features, full, generator=generator)
        pooled, _ = self.gpo(features, lengths)  # [B * V, E]
        pooled = nn.functional.normalize(pooled.float(), dim=-1)
        return pooled.view(batch, -1)  # [B, V * E]


class TextEncoder(nn.Module):
    """BERT token features -> dropout -> linear + MLP residual -> GPO -> LayerNorm.

    `dropout` (`model.text_dropout`) acts on BERT's output features, shared by the linear and
    MLP branches, as the official code's `nn.Dropout(0.2)`; it is the identity at evaluation.
    """

    def __init__(self, backbone: PreTrainedModel, embed_size: int, mlp_norm: str = "layer", dropout: float = 0.0):
        super().__init__()
        self.backbone = backbone
        hidden = backbone.config.hidden_size
        self.dropout = nn.Dropout(dropout)
        self.fc = nn.Linear(hidden, embed_size)
        self.mlp = MLP(hidden, embed_size // 2, embed_size, layers=2, norm=mlp_norm)
        self.gpo = GPO()
        self.norm = nn.LayerNorm(embed_size)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """`[B, L]` token ids and mask -> `[B, E]`."""
        positions = self.backbone.config.max_position_embeddings
        if input_ids.size(1) > positions:  # reachable with model.text.max_len: 0; BERT would fail with an index error
            raise DataError(
                f"a caption of {input_ids.size(1)} word pieces is longer than the text backbone's {positions} positions "
                f"(model.text.max_len: 0 does not truncate); set model.text.max_len to at most {positions}"
            )
        # transformers takes a 4D mask as it is; from a 2D one it would first read the mask back to the host to see
        # whether any token is padding, making every step wait for the device.
        keys = attention_mask[:, None, None, :].bool()  # [B, 1, 1, L]: which tokens every query attends to
        tokens = self.dropout(self.backbone(input_ids=input_ids, attention_mask=keys).last_hidden_state)  # [B, L, hidden]
        features = self.fc(tokens) + self.mlp(tokens)  # [B, L, E]
        lengths = attention_mask.sum(dim=1)  # [B]
        pooled, _ = self.gpo(features, lengths)  # [B, E]
        return self.norm(pooled.float())
