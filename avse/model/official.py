"""Checkpoints of the official AVSE code, converted to this package's model.

The official training script saves `{"model": state_dict, "opt": argparse.Namespace,
...}` with its own module names (`img_enc.visual_encoder`, `txt_enc.bert`, ...) and the
backbones' names of transformers 4 (`encoder.layer.N.attention.attention.query`). Its
model skips ViT's final LayerNorm and uses BatchNorm in the text MLP, so an imported
model sets `model.vision_final_norm: false` and `model.text_mlp_norm: batch`; it sees
images and captions as the official code does: ImageNet pixel statistics, whole images
stretched to a square, captions never truncated, and its keep count (`tokens`).
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from torch import Tensor

from avse.errors import AvseError
from avse.checkpoint import UnsafeCheckpointError, load_checkpoint

# Module prefixes: official -> ours. The text MLP is Linear, BatchNorm, ReLU, Linear in both.
_MODULES = [
    (r"^img_enc\.visual_encoder\.", "image_encoder.backbone."),
    (r"^img_enc\.image_encoder\.fc\.", "image_encoder.proj."),
    (r"^img_enc\.image_encoder\.gpool\.", "image_encoder.gpo."),
    (r"^txt_enc\.bert\.", "text_encoder.backbone."),
    (r"^txt_enc\.fc\.", "text_encoder.fc."),
    (r"^txt_enc\.ln\.", "text_encoder.norm."),
    (r"^txt_enc\.gpool\.", "text_encoder.gpo."),
    (r"^txt_enc\.mlp\.layers\.0\.", "text_encoder.mlp.net.0."),
    (r"^txt_enc\.mlp\.bns\.0\.", "text_encoder.mlp.net.1."),
    (r"^txt_enc\.mlp\.layers\.1\.", "text_encoder.mlp.net.3."),
    (r"^sim_enc\.bin_score$", "dustbin"),
]

# Backbone names of transformers 4 -> 5, applied in order inside `image_encoder.backbone.`.
_BACKBONE = {
    "vit": [
        (r"^encoder\.layer\.(\d+)\.attention\.attention\.query\.", r"layers.\1.attention.q_proj."),
        (r"^encoder\.layer\.(\d+)\.attention\.attention\.key\.", r"layers.\1.attention.k_proj."),
        (r"^encoder\.layer\.(\d+)\.attention\.attention\.value\.", r"layers.\1.attention.v_proj."),
        (r"^encoder\.layer\.(\d+)\.attention\.output\.dense\.", r"layers.\1.attention.o_proj."),
        (r"^encoder\.layer\.(\d+)\.intermediate\.dense\.", r"layers.\1.mlp.fc1."),
        (r"^encoder\.layer\.(\d+)\.output\.dense\.", r"layers.\1.mlp.fc2."),
        (r"^encoder\.layer\.(\d+)\.layernorm_(before|after)\.", r"layers.\1.layernorm_\2."),
    ],
    "swin": [
        (r"attention\.self\.(query|key|value)\.", lambda m: f"attention.{m.group(1)[0]}_proj."),
        (r"attention\.self\.relative_position_bias_table$", "attention.relative_position_bias.relative_position_bias_table"),
        (r"attention\.output\.dense\.", "attention.o_proj."),
        (r"intermediate\.dense\.", "mlp.fc1."),
        (r"\.output\.dense\.", ".mlp.fc2."),
    ],
}

# Ours only (the InfoNCE temperature): an imported model keeps its initial value.
NOT_IN_OFFICIAL = ("logit_scale",)

# Official entries the official forward never uses, or buffers this model recomputes.
_UNUSED = re.compile(
    r"(^img_enc\.visual_encoder\.pooler\.|^txt_enc\.bert\.pooler\.|^txt_enc\.mlp\.bns\.1\."
    r"|\.position_ids$|\.relative_position_index$)"
)


def read_checkpoint(path: str | Path, trust: bool = False) -> dict[str, Any]:
    """The official checkpoint's contents, read without executing pickled code unless `trust`.

    Without `trust` only tensors, plain values and the `argparse.Namespace` of options are
    accepted; anything else (numpy scalars, custom classes) needs `trust`.
    """
    try:
        content = load_checkpoint(path, allowed=[argparse.Namespace], trusted=trust)
    except UnsafeCheckpointError as err:
        raise AvseError(f"{err}: loading them runs code from the file; pass --trust-checkpoint "
                        "only if you trust where it came from") from None
    if not isinstance(content, dict) or not isinstance(content.get("model"), dict):
        raise AvseError(f"{path}: not an official AVSE checkpoint (expected a dict with a 'model' state dict)")
    return content


def options(content: dict[str, Any]) -> dict[str, Any]:
    """The training options stored with the checkpoint (`opt`), as a dict."""
    opt = content.get("opt")
    return vars(opt) if isinstance(opt, argparse.Namespace) else dict(opt or {})


def settings(opt: dict[str, Any]) -> list[str]:
    """`-S` overrides that rebuild the official model, and the way it sees its inputs, from its options."""
    overrides = ["model.views=2", "model.block_dim=256", "model.keep_ratio=0.8", "model.eval_keep_ratio=0.9",
                 "model.alpha=4.0", "model.matching=max", "model.vision_final_norm=false", "model.text_mlp_norm=batch",
                 "model.view_sampling=nearest", "model.keep_count=tokens", "model.pixel_stats=imagenet",
                 "model.vision.init=random", "model.text.name=bert-base-uncased", "model.text.init=pretrained",
                 "model.text.max_len=0", "data.resize=stretch"]
    known = {"vit_type": "model.vision.name", "embed_size": "model.embed_size", "img_res": "data.img_res",
             "dataset": "data.dataset"}
    overrides += [f"{key}={opt[name]}" for name, key in known.items() if opt.get(name) is not None]
    if "size_augment" in opt:
        overrides.append(f"model.size_augment={str(bool(opt['size_augment'])).lower()}")
    return overrides


def convert_state_dict(official: dict[str, Tensor], family: str) -> dict[str, Tensor]:
    """Official parameter names -> this package's (`module.` prefixes of DDP saves removed)."""
    converted: dict[str, Tensor] = {}
    unknown = []
    for name, tensor in official.items():
        name = name.removeprefix("module.")
        if _UNUSED.search(name):
            continue
        ours = _rename(name, _MODULES)
        if ours is None:
            unknown.append(name)
            continue
        if ours.startswith("image_encoder.backbone."):
            inner = ours.removeprefix("image_encoder.backbone.")
            ours = "image_encoder.backbone." + (_rename(inner, _BACKBONE[family]) or inner)
        converted[ours] = tensor
    if unknown:
        raise AvseError(f"{len(unknown)} parameters of no known official module: {', '.join(unknown[:5])}")
    return converted


def _rename(name: str, rules: list) -> str | None:
    """`name` with the first matching rule applied, or None when no rule matches."""
    for pattern, replacement in rules:
        renamed, count = re.subn(pattern, replacement, name, count=1)
        if count:
            return renamed
    return None


def vision_image_size(state: dict[str, Tensor], family: str, patch_size: int) -> int | None:
    """The resolution a ViT's position embeddings were built for (None for Swin, whose tables do not depend on it)."""
    if family != "vit":
        return None
    positions = state["image_encoder.backbone.embeddings.position_embeddings"].shape[1] - 1  # minus the class token
    side = round(positions ** 0.5)
    if side * side != positions:
        raise AvseError(f"ViT position embeddings of {positions} patches are not a square grid")
    return side * patch_size
