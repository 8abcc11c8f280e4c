"""The AVSE model: a multi-view image encoder, a text encoder, and meta-semantic matching.

    images uint8 [B, 3, R, R] --ImageEncoder--> [B, views * embed_size]
    input_ids [B, L]          --TextEncoder-->  [B, embed_size]
    similarity(img [N, Di], cap [M, Dt]) -> [N, M]  (meta_similarity or sinkhorn_similarity)
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import Tensor, nn
from transformers.modeling_layers import GradientCheckpointingLayer

from avse.compute import recompute_as_forward
from avse.config import Config
from avse.errors import ConfigError
from avse.model import backbones
from avse.model.encoders import ImageEncoder, TextEncoder
from avse.model.similarity import block_similarity

# CLIP's cap on the logit scale (100); its initial temperature, 0.07, is `train.temperature`'s default.
MAX_LOGIT_SCALE = math.log(100)


class AVSE(nn.Module):
    def __init__(self, image_encoder: ImageEncoder, text_encoder: TextEncoder, block_dim: int, matching: str, sinkhorn_iters: int,
                 temperature: float):
        super().__init__()
        self.image_encoder, self.text_encoder = image_encoder, text_encoder
        self.block_dim, self.matching, self.sinkhorn_iters = block_dim, matching, sinkhorn_iters
        # Both are built in every configuration, so that checkpoints have one layout; `unused_parameters` says when they are idle.
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / temperature)))  # used by the InfoNCE loss
        self.dustbin = nn.Parameter(torch.tensor(1.0))  # used by Sinkhorn matching

    def forward(self, images: Tensor, input_ids: Tensor, attention_mask: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """Both embeddings in one call (what DistributedDataParallel wraps): `[B, V * E]`, `[B, E]`."""
        return self.encode_image(images, generator), self.encode_text(input_ids, attention_mask)

    def encode_image(self, images: Tensor, generator: torch.Generator | None = None) -> Tensor:
        return self.image_encoder(images, generator)

    def encode_text(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        return self.text_encoder(input_ids, attention_mask)

    def similarity(self, img: Tensor, cap: Tensor, chunk_size: int = 256) -> Tensor:
        """`[N, Di]` x `[M, Dt]` -> `[N, M]`; a sum over the `Dt / block_dim` text blocks."""
        return block_similarity(img, cap, self.block_dim, self.matching, chunk_size, self.dustbin, self.sinkhorn_iters)

    @property
    def text_blocks(self) -> int:
        return self.text_encoder.norm.normalized_shape[0] // self.block_dim

    def scaled_logit_scale(self) -> Tensor:
        return self.logit_scale.clamp(max=MAX_LOGIT_SCALE)

    def unused_parameters(self, loss: str) -> list[str]:
        """Names of the parameters that training with `loss` never uses in this configuration.

        They are kept (checkpoints, official imports and pretrained folders hold them) but must be
        frozen: DistributedDataParallel expects a gradient for every parameter that requires one.
        """
        unused = [f"image_encoder.{name}" for name in self.image_encoder.unused_parameters()]
        if loss != "infonce":
            unused.append("logit_scale")
        if self.matching != "sinkhorn":
            unused.append("dustbin")
        return unused

    def enable_activation_checkpointing(self) -> None:
        """Recompute each transformer block of both backbones in the backward pass instead of keeping its activations.

        Only the innermost blocks are checkpointed (a Swin stage holds checkpointed blocks: checkpointing it
        too would recompute them twice). The random state is replayed, so gradients do not change.
        """
        for backbone in (self.image_encoder.backbone, self.text_encoder.backbone):
            backbone.config.use_cache = False  # BERT's key/value cache, unused here, would be switched off with a warning
            options = {"use_reentrant": False, "context_fn": recompute_as_forward}
            if hasattr(backbone, "activation_checkpointing_enable"):
                backbone.activation_checkpointing_enable(options)
            else:  # its name before transformers 5.24 (later, a deprecated alias)
                backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        innermost = set(self.transformer_blocks())
        for module in self.modules():
            if isinstance(module, GradientCheckpointingLayer) and module not in innermost:
                module.gradient_checkpointing = False

    def transformer_blocks(self) -> list[nn.Module]:
        """The repeated blocks of both backbones (ViT, Swin and BERT layers), innermost first where they nest."""
        return [module for backbone in (self.image_encoder.backbone, self.text_encoder.backbone) for module in backbone.modules()
                if isinstance(module, GradientCheckpointingLayer)
                and not any(isinstance(inner, GradientCheckpointingLayer) for inner in list(module.modules())[1:])]

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Backbone and head parameters, each split into decayed weights and undecayed norms and biases."""
        groups: dict[str, list[nn.Parameter]] = {"backbone": [], "backbone_no_decay": [], "head": [], "head_no_decay": []}
        for name, param in self.named_parameters():
            if not param.requires_grad:
                continue
            part = "backbone" if ".backbone." in f".{name}" else "head"
            no_decay = param.ndim < 2 or "norm" in name.lower() or name in ("logit_scale", "dustbin")
            groups[part + ("_no_decay" if no_decay else "")].append(param)
        return groups


def build_model(config: Config, vocab_size: int | None, vision_image_size: int | None = None) -> AVSE:
    """The configured model; `vocab_size` sizes a randomly initialised text backbone's embeddings.

    `vision_image_size` is the resolution the vision backbone's position embeddings were
    built for, when trained weights are about to be loaded into it.
    """
    model_cfg, img_res = config.model, config.data.img_res
    family, vision = backbones.build(model_cfg.vision, "model.vision", ("vit", "swin"), input_res=img_res, native_res=vision_image_size)
    text_overrides = {"vocab_size": vocab_size} if model_cfg.text.init == "random" else {}
    _, text = backbones.build(model_cfg.text, "model.text", ("bert",), **text_overrides)
    if model_cfg.text.max_len > text.config.max_position_embeddings:
        raise ConfigError(
            f"model.text.max_len: {model_cfg.text.max_len} is longer than {model_cfg.text.name}'s "
            f"{text.config.max_position_embeddings} positions"
        )
    image_encoder = ImageEncoder(
        vision, family, img_res, model_cfg.embed_size, model_cfg.views,
        model_cfg.keep_ratio, model_cfg.eval_keep_ratio, model_cfg.alpha, model_cfg.size_augment,
        model_cfg.vision_final_norm, model_cfg.view_sampling, model_cfg.keep_count, model_cfg.pixel_stats,
    )
    text_encoder = TextEncoder(text, model_cfg.embed_size, model_cfg.text_mlp_norm, model_cfg.text_dropout)
    model = AVSE(image_encoder, text_encoder, model_cfg.block_dim, model_cfg.matching, model_cfg.sinkhorn_iters, config.train.temperature)
    parameters = dict(model.named_parameters())
    for name in model.unused_parameters(config.train.loss):
        parameters[name].requires_grad_(False)
    if config.train.grad_checkpointing:
        model.enable_activation_checkpointing()
    if config.train.compile:
        blocks = model.transformer_blocks()
        # Every block enters Dynamo through one function that transformers shares between its layers, and that
        # function's compilations count against one limit (8 by default): past it, blocks run eagerly with one warning.
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 2 * len(blocks))
        for block in blocks:  # in place: parameter names and checkpoints stay as they are
            block.compile()
    return model


def parameters_without_gradient(model: nn.Module) -> list[str]:
    """Trainable parameters that the last backward pass left without a gradient (DDP stops on any)."""
    return [name for name, param in model.named_parameters() if param.requires_grad and param.grad is None]


def random_backbones(config: Config) -> Config:
    """`config` with both backbones randomly initialised: the architecture alone, for weights loaded
    afterwards (or none at all), with no download."""
    model = config.model
    return dataclasses.replace(config, model=dataclasses.replace(
        model, vision=dataclasses.replace(model.vision, init="random"), text=dataclasses.replace(model.text, init="random")))


def from_checkpoint(checkpoint: dict) -> tuple[AVSE, Config]:
    """The trained model of a `best.pt` checkpoint, built from the config it was trained with.

    Backbones are built with random weights and then overwritten, so no pretrained
    download is needed to use a trained model.
    """
    from avse.config import from_dict

    trained = from_dict(checkpoint["config"])
    model = build_model(random_backbones(trained), checkpoint["vocab_size"], checkpoint["vision_image_size"])
    model.load_state_dict(checkpoint["model"])
    return model.eval(), trained
