"""Typed configuration: the sections of `params.yaml`, validated before any work starts.

Every value is checked against its field's type and constraint; a wrong value or an
unknown key stops with one line naming the key, the value and what is allowed, e.g.
`train.batch_size: -4 is not a positive integer`. Overrides use DVC's `-S key=value`
syntax, with the value parsed as YAML.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import json
import math
import types
import typing
from collections.abc import Hashable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from avse.errors import ConfigError

PARAMS_FILE = "params.yaml"
# Settings that change how a run is observed or what memory it takes, not what it computes: runs that
# differ only in these (and in `train.seed`) are repeats of one experiment.
OBSERVATION_KEYS = frozenset({"train.log_every", "train.ckpt_every_steps", "train.max_bad_steps", "data.num_workers",
                              "train.grad_checkpointing", "train.dist_timeout_minutes", "train.compile", "train.threads", "train.gpus"})


def _check(description: str, predicate):
    """Field metadata: an extra constraint with the phrase used when it fails."""
    return {"check": (description, predicate)}


POSITIVE = _check("a positive integer", lambda v: v > 0)
NON_NEGATIVE = _check("a non-negative integer", lambda v: v >= 0)
POSITIVE_FLOAT = _check("a positive number", lambda v: v > 0)
NON_NEGATIVE_FLOAT = _check("a non-negative number", lambda v: v >= 0)
FRACTION = _check("a number in (0, 1]", lambda v: 0 < v <= 1)
PROBABILITY = _check("a number in [0, 1)", lambda v: 0 <= v < 1)
# Seeds are hashed as unsigned 64-bit words (avse/training/seeding.py derive_seed).
SEED = _check("an integer in [0, 2**64)", lambda v: 0 <= v < 2**64)
# The prepared splits; a name, never a path, since `embeddings/<split>/` is replaced when embedding.
SplitName = Literal["train", "dev", "test", "testall"]


@dataclass(frozen=True)
class SyntheticConfig:
    """The embedded synthetic dataset (used when `data.dataset` is `synthetic`)."""

    seed: int = 0
    image_size: int = field(default=64, metadata=_check("an integer >= 32", lambda v: v >= 32))
    train_images: int = field(default=10000, metadata=POSITIVE)
    dev_images: int = field(default=1000, metadata=POSITIVE)
    test_images: int = field(default=1000, metadata=POSITIVE)
    min_objects: int = field(default=4, metadata=_check("an integer >= 4 (a caption names at most 3 objects and must never cover a whole image)", lambda v: v >= 4))
    max_objects: int = field(default=4, metadata=POSITIVE)


@dataclass(frozen=True)
class AugmentConfig:
    """Training image augmentation, as the official code (avse/data/augment.py); embedding and evaluation never augment."""

    crop: bool = True  # random crop of r x each side, r ~ U(0.6, 1), stretched to data.img_res
    flip: bool = True  # horizontal flip with probability 0.5
    # A flipped image's caption: `swap` its left/right words ("left of" is false in a mirror); `keep` (the official code).
    flip_captions: Literal["swap", "keep"] = "swap"


@dataclass(frozen=True)
class DataConfig:
    dataset: Literal["synthetic", "f30k", "coco"] = "synthetic"
    root: str = "data/synthetic"
    images: str = "data/synthetic-images"
    format: Literal["auto", "splits", "karpathy"] = "auto"
    img_res: int = field(default=64, metadata=POSITIVE)
    cache_res: int = field(default=64, metadata=NON_NEGATIVE)
    # A whole image as a square: `stretch` both sides (the official code, VSE-infinity); `crop` short side + centre crop.
    resize: Literal["stretch", "crop"] = "stretch"
    on_bad_image: Literal["fail", "skip"] = "fail"
    vocab_size: int = field(default=1000, metadata=_check("an integer >= 100", lambda v: v >= 100))
    dev_images: int = field(default=1000, metadata=NON_NEGATIVE)  # carved from train when the data has no dev split
    num_workers: int = field(default=2, metadata=NON_NEGATIVE)
    # Training captions: each word masked, replaced or deleted with this probability (avse/data/tokenizer.py
    # augment_caption); the official code uses 0.2.
    caption_augment: float = field(default=0.0, metadata=PROBABILITY)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)


@dataclass(frozen=True)
class BackboneConfig:
    name: str = ""
    init: Literal["random", "pretrained"] = "random"


@dataclass(frozen=True)
class TextConfig(BackboneConfig):
    # Word pieces per caption, [CLS] and [SEP] included; 0: no truncation (the official code), up to the backbone's positions.
    max_len: int = field(default=32, metadata=_check("0 (no truncation) or an integer >= 2 ([CLS] and [SEP] count)", lambda v: v == 0 or v >= 2))


@dataclass(frozen=True)
class ModelConfig:
    vision: BackboneConfig = field(default_factory=lambda: BackboneConfig(name="vit-tiny-p16"))
    text: TextConfig = field(default_factory=lambda: TextConfig(name="bert-tiny"))
    embed_size: int = field(default=256, metadata=POSITIVE)
    block_dim: int = field(default=64, metadata=POSITIVE)
    views: int = field(default=2, metadata=_check("an integer >= 1", lambda v: v >= 1))
    keep_ratio: float = field(default=0.8, metadata=FRACTION)
    eval_keep_ratio: float = field(default=0.9, metadata=FRACTION)
    alpha: float = field(default=4.0, metadata=NON_NEGATIVE_FLOAT)
    # Training views: `gumbel` draws patches without replacement around a continuous random
    # centre; `nearest` (the official code) keeps the nearest patches of a random patch.
    view_sampling: Literal["gumbel", "nearest"] = "gumbel"
    # Patches per view: `patches` round(ratio x P); `tokens` (the official code) int(ratio x (P + 1)),
    # the class token counted: 157 / 176 vs 157 / 177 of 196 at 0.8 / 0.9.
    keep_count: Literal["patches", "tokens"] = "patches"
    # Pixel mean/std: `backbone` the family's own (ViT 0.5/0.5); `imagenet` for every backbone (the official code).
    pixel_stats: Literal["backbone", "imagenet"] = "backbone"
    matching: Literal["max", "sinkhorn"] = "max"
    sinkhorn_iters: int = field(default=20, metadata=POSITIVE)
    size_augment: bool = True
    # The official code skips ViT's final LayerNorm and normalises the text MLP with
    # BatchNorm; `avse import-checkpoint` sets both to reproduce its models.
    vision_final_norm: bool = True
    text_mlp_norm: Literal["layer", "batch"] = "layer"
    # Dropout on the text backbone's token features, before the projection and MLP; the official code uses 0.2.
    text_dropout: float = field(default=0.0, metadata=PROBABILITY)


@dataclass(frozen=True)
class TrainConfig:
    seed: int = field(default=0, metadata=SEED)
    deterministic: bool = True  # bitwise-repeatable kernels (avse/training/seeding.py)
    batch_size: int = field(default=128, metadata=POSITIVE)
    epochs: int = field(default=6, metadata=POSITIVE)
    max_steps: int = field(default=0, metadata=NON_NEGATIVE)
    nproc_per_node: int = field(default=1, metadata=POSITIVE)
    threads: int = field(default=0, metadata=NON_NEGATIVE)  # 0: the cores available over the processes on the node
    gpus: Literal["all", "auto"] = "all"
    precision: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    loss: Literal["hinge", "infonce"] = "infonce"
    margin: float = field(default=0.2, metadata=NON_NEGATIVE_FLOAT)
    temperature: float = field(default=0.07, metadata=POSITIVE_FLOAT)  # InfoNCE's initial temperature (learnt)
    warmup_epochs: int = field(default=1, metadata=NON_NEGATIVE)
    decorrelation_weight: float = field(default=0.005, metadata=NON_NEGATIVE_FLOAT)
    # `standardised`: ||C - I||^2 / D of batch-standardised views; `official`: the official
    # code's formula (paper weight 1). `decorrelation_weight` multiplies either.
    decorrelation: Literal["standardised", "official"] = "standardised"
    lr: float = field(default=2e-4, metadata=POSITIVE_FLOAT)
    backbone_lr_mult: float = field(default=0.1, metadata=NON_NEGATIVE_FLOAT)
    weight_decay: float = field(default=1e-4, metadata=NON_NEGATIVE_FLOAT)
    lr_schedule: Literal["step", "cosine"] = "step"
    lr_decay_epochs: list[int] = field(default_factory=lambda: [9, 15, 20, 25])
    lr_decay_rate: float = field(default=0.3, metadata=POSITIVE_FLOAT)
    warmup_steps: int = field(default=0, metadata=NON_NEGATIVE)
    grad_clip: float = field(default=2.0, metadata=NON_NEGATIVE_FLOAT)
    grad_accum: int = field(default=1, metadata=POSITIVE)
    # Activation checkpointing in both backbones: each block's activations are recomputed in the backward
    # pass instead of kept, for the same gradients in less memory and about a third more compute.
    grad_checkpointing: bool = False
    # torch.compile of every transformer block of both backbones: faster steps after a compilation of
    # minutes at the start (and again for new caption lengths, until its shapes are dynamic).
    compile: bool = False
    # How long a process waits for the others in a collective (dev evaluation and checkpoints run on
    # the first process while the others wait) before the run stops with an error naming this key.
    dist_timeout_minutes: float = field(default=30.0, metadata=POSITIVE_FLOAT)
    ckpt_every_steps: int = field(default=0, metadata=NON_NEGATIVE)
    log_every: int = field(default=20, metadata=POSITIVE)
    max_bad_steps: int = field(default=10, metadata=POSITIVE)


@dataclass(frozen=True)
class EmbedConfig:
    split: SplitName = "test"
    batch_size: int = field(default=256, metadata=POSITIVE)


@dataclass(frozen=True)
class EvalConfig:
    protocol: Literal["auto", "1k", "5fold1k", "5k"] = "auto"
    chunk_size: int = field(default=256, metadata=POSITIVE)
    pm_gt_dir: str = field(default="", metadata={"may_be_empty": True})  # "": no PMRP


@dataclass(frozen=True)
class TrackingConfig:
    enabled: bool = True
    uri: str = "sqlite:///mlflow.db"
    experiment: str = "avse"


@dataclass(frozen=True)
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    embed: EmbedConfig = field(default_factory=EmbedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def flat(self) -> dict[str, Any]:
        """`{"train.batch_size": 128, ...}`: the keys users write with `-S`."""
        return flatten(self.to_dict())

    def hash(self, *sections: str) -> str:
        """A short stable hash of the given sections (all when none are given)."""
        content = self.to_dict()
        return stable_hash({name: content[name] for name in sections} if sections else content)


def stable_hash(content: Any) -> str:
    """16 hex digits of the SHA-256 of `content` as canonical JSON."""
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def load_config(path: str | Path = PARAMS_FILE, overrides: typing.Sequence[str] = ()) -> Config:
    """Read `params.yaml`, apply `key=value` overrides, and validate everything."""
    raw = read_yaml_mapping(path, "run from the project root or pass --params")
    for override in overrides:
        apply_override(raw, override)
    return from_dict(raw)


def read_yaml_mapping(path: str | Path, missing_hint: str) -> dict[str, Any]:
    """The mapping a YAML file holds (empty for an empty file); any other content stops with the file's name."""
    path = Path(path)
    try:
        raw = load_yaml(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found ({missing_hint})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}".replace("\n", " ")) from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections, got {type(raw).__name__}")
    return raw


class _UniqueKeyLoader(yaml.SafeLoader):
    """The safe loader, except that a key written twice in one mapping is an error: PyYAML keeps the last
    value silently (a second `train:` section replaces the first), where DVC refuses the file."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        first_nodes: dict[Any, yaml.Node] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults` may be overridden by design
                continue
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, Hashable):
                continue  # the safe loader refuses it below
            first = first_nodes.setdefault(key, key_node)
            if first is not key_node:
                raise yaml.constructor.ConstructorError(
                    problem=f"key {key!r} appears twice (lines {first.start_mark.line + 1} and {key_node.start_mark.line + 1})")
        return super().construct_mapping(node, deep)


def load_yaml(text: str) -> Any:
    """YAML `text` as `yaml.safe_load` reads it, with a key written twice in one mapping refused."""
    return yaml.load(text, Loader=_UniqueKeyLoader)


def apply_override(tree: dict[str, Any], override: str) -> None:
    """Set `a.b.c=value` in a nested dict, parsing the value as YAML (as `dvc exp run -S`)."""
    key, sep, text = override.partition("=")
    if not sep or not key:
        raise ConfigError(f"override {override!r}: expected key=value, e.g. train.batch_size=64")
    try:
        value = load_yaml(text)
    except yaml.YAMLError:
        value = text
    *parents, leaf = key.strip().split(".")
    node = tree
    for i, part in enumerate(parents):
        if node.get(part) is None:  # absent, or an empty section (`eval:` with nothing under it)
            node[part] = {}
        child = node[part]
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parents[: i + 1])}: is a value, not a section; cannot set {key}")
        node = child
    node[leaf] = value


def from_dict(raw: dict[str, Any]) -> Config:
    config = _build(Config, raw, prefix="")
    _check_relations(config)
    return config


def _build(cls: type, raw: Any, prefix: str) -> Any:
    section = prefix.rstrip(".") or "params"
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{section}: {raw!r} is not a section (expected key: value pairs)")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f" (did you mean {prefix}{close[0]}?)" if close else f" (allowed: {', '.join(fields)})"
            raise ConfigError(f"{prefix}{key}: unknown key{hint}")
    values = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        values[name] = _coerce(hints[name], raw[name], f"{prefix}{name}", f.metadata)
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str, metadata: typing.Mapping[str, Any]) -> Any:
    origin = typing.get_origin(hint)
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, f"{key}.")
    if origin is Literal:
        allowed = typing.get_args(hint)
        if value not in allowed:
            raise ConfigError(f"{key}: {value!r} is not one of {', '.join(map(str, allowed))}")
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None:
            return None
        (hint,) = [arg for arg in typing.get_args(hint) if arg is not type(None)]
        return _coerce(hint, value, key, metadata)
    if origin is list:
        (item,) = typing.get_args(hint)
        if not isinstance(value, list):
            raise ConfigError(f"{key}: {value!r} is not a list")
        return [_coerce(item, v, f"{key}[{i}]", metadata) for i, v in enumerate(value)]
    value = _scalar(hint, value, key, metadata)
    if "check" in metadata:
        description, predicate = metadata["check"]
        if not predicate(value):
            raise ConfigError(f"{key}: {value!r} is not {description}")
    return value


def _scalar(hint: type, value: Any, key: str, metadata: typing.Mapping[str, Any]) -> Any:
    expected = metadata.get("check", (None,))[0]
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: {value!r} is not true or false")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{key}: {value!r} is not {expected or 'an integer'}")
    if hint is float:
        try:  # a string too: YAML 1.1 reads `1e-3` (no dot) as one
            number = float(value) if isinstance(value, (int, float, str)) and not isinstance(value, bool) else None
        except ValueError:
            number = None
        except OverflowError:  # an integer beyond the largest float
            number = math.inf
        if number is None:
            raise ConfigError(f"{key}: {value!r} is not {expected or 'a number'}")
        if not math.isfinite(number):  # `.inf`, `1e309` or `.nan` would only fail mid-run
            raise ConfigError(f"{key}: {value!r} is not a finite number")
        return number
    if hint is str:
        if isinstance(value, str) and "\0" in value:  # no file name holds one
            raise ConfigError(f"{key}: {value!r} contains a NUL byte")
        if isinstance(value, str) and (value or metadata.get("may_be_empty")):
            return value
        raise ConfigError(f"{key}: {value!r} is not a {'' if metadata.get('may_be_empty') else 'non-empty '}string")
    raise TypeError(f"unsupported parameter type {hint} for {key}")


def _check_relations(config: Config) -> None:
    """Constraints that involve more than one key."""
    model, synthetic = config.model, config.data.synthetic
    if model.embed_size % model.block_dim:
        raise ConfigError(
            f"model.block_dim: {model.block_dim} does not divide model.embed_size ({model.embed_size})"
        )
    if synthetic.max_objects < synthetic.min_objects:
        raise ConfigError(
            f"data.synthetic.max_objects: {synthetic.max_objects} is below "
            f"data.synthetic.min_objects ({synthetic.min_objects})"
        )
