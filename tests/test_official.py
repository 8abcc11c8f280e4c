"""`avse import-checkpoint`: checkpoints of the official AVSE code, in its layout and transformers-4 names."""

import argparse
import json
import re
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image
from transformers import BertConfig

from avse import pipeline
from avse.config import BackboneConfig, load_config
from avse.data.dataset import ImageDataset, PreparedSplit
from avse.data.tokenizer import train_wordpiece
from avse.data.images import load_rgb, resize_square
from avse.errors import AvseError, ConfigError
from avse.evaluation.embed import load_trained
from avse.model import backbones, official
from avse.model.avse import build_model
from avse.model.sampling import view_centres

REPO = Path(__file__).resolve().parents[1]
OPTIONS = dict(vit_type="vit-tiny", embed_size=256, img_res=64, dataset="f30k", size_augment=1, batch_size=128)

# transformers-4 names of ViT and Swin blocks, as the official code's checkpoints hold them.
LEGACY_VIT = [
    (r"^layers\.(\d+)\.attention\.q_proj\.", r"encoder.layer.\1.attention.attention.query."),
    (r"^layers\.(\d+)\.attention\.k_proj\.", r"encoder.layer.\1.attention.attention.key."),
    (r"^layers\.(\d+)\.attention\.v_proj\.", r"encoder.layer.\1.attention.attention.value."),
    (r"^layers\.(\d+)\.attention\.o_proj\.", r"encoder.layer.\1.attention.output.dense."),
    (r"^layers\.(\d+)\.mlp\.fc1\.", r"encoder.layer.\1.intermediate.dense."),
    (r"^layers\.(\d+)\.mlp\.fc2\.", r"encoder.layer.\1.output.dense."),
    (r"^layers\.(\d+)\.layernorm_", r"encoder.layer.\1.layernorm_"),
]
LEGACY_SWIN = [
    (r"attention\.q_proj\.", "attention.self.query."),
    (r"attention\.k_proj\.", "attention.self.key."),
    (r"attention\.v_proj\.", "attention.self.value."),
    (r"attention\.o_proj\.", "attention.output.dense."),
    (r"attention\.relative_position_bias\.relative_position_bias_table", "attention.self.relative_position_bias_table"),
    (r"mlp\.fc1\.", "intermediate.dense."),
    (r"mlp\.fc2\.", "output.dense."),
]
LEGACY_HEAD = {
    "image_encoder.proj.": "img_enc.image_encoder.fc.",
    "image_encoder.gpo.": "img_enc.image_encoder.gpool.",
    "text_encoder.backbone.": "txt_enc.bert.",
    "text_encoder.fc.": "txt_enc.fc.",
    "text_encoder.norm.": "txt_enc.ln.",
    "text_encoder.gpo.": "txt_enc.gpool.",
    "text_encoder.mlp.net.0.": "txt_enc.mlp.layers.0.",
    "text_encoder.mlp.net.1.": "txt_enc.mlp.bns.0.",
    "text_encoder.mlp.net.3.": "txt_enc.mlp.layers.1.",
}


def legacy(name: str, rules) -> str:
    for pattern, replacement in rules:
        name = re.sub(pattern, replacement, name)
    return name


def official_layout(state: dict, prefix: str = "") -> dict:
    """Our state dict under the official module names, plus the entries its forward never uses."""
    out = {}
    for name, tensor in state.items():
        if name.startswith("image_encoder.backbone."):
            key = "img_enc.visual_encoder." + legacy(name.removeprefix("image_encoder.backbone."), LEGACY_VIT)
        elif name == "dustbin":
            key = "sim_enc.bin_score"
        elif name == "logit_scale":
            continue  # the official model has no temperature
        else:
            ours = next(p for p in LEGACY_HEAD if name.startswith(p))
            key = LEGACY_HEAD[ours] + name.removeprefix(ours)
        out[prefix + key] = tensor.clone()
    out[prefix + "img_enc.visual_encoder.pooler.dense.weight"] = torch.zeros(128, 128)
    out[prefix + "txt_enc.bert.embeddings.position_ids"] = torch.arange(128)[None]
    out[prefix + "txt_enc.mlp.bns.1.weight"] = torch.ones(256)
    return out


@pytest.fixture
def bert_folder(tmp_path) -> Path:
    """A local 'pretrained' BERT: config and vocabulary, as a user would pass with -S model.text.name=..."""
    folder = tmp_path / "bert"
    tokenizer = train_wordpiece(["a red circle left of a blue square", "two small green triangles"] * 20, folder, vocab_size=60)
    BertConfig(vocab_size=len(tokenizer), hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=256).save_pretrained(folder)
    return folder


def reference_model(bert_folder: Path, options: dict = OPTIONS):
    """A model of the official architecture with random weights and non-trivial BatchNorm statistics."""
    overrides = official.settings(options) + [f"model.text.name={bert_folder}", "model.text.init=random"]
    config = load_config(REPO / "params.yaml", overrides)
    torch.manual_seed(0)
    model = build_model(config, vocab_size=BertConfig.from_pretrained(bert_folder).vocab_size)
    bn = model.text_encoder.mlp.net[1]
    bn.running_mean.uniform_(-1, 1)
    bn.running_var.uniform_(0.5, 2)
    return model.eval()


def save_official(path: Path, model, options: dict = OPTIONS, **extra) -> Path:
    torch.save({"model": official_layout(model.state_dict(), **extra.pop("layout", {})), "opt": argparse.Namespace(**options),
                "epoch": 12, "Eiters": 3400, **extra}, path)
    return path


def test_an_official_checkpoint_converts_to_a_model_with_the_same_embeddings(tmp_path, bert_folder):
    reference = reference_model(bert_folder)
    source = save_official(tmp_path / "model_best.pth", reference, best_rsum=512.5, layout={"prefix": "module."})

    written = pipeline.import_checkpoint(source, REPO / "params.yaml", [f"model.text.name={bert_folder}"], out_dir=tmp_path / "models")

    assert written == tmp_path / "models" / "best.pt"
    imported, config, tokenize, checkpoint = load_trained(tmp_path / "models")
    assert (config.model.vision.name, config.model.embed_size, config.model.block_dim, config.data.img_res) == ("vit-tiny", 256, 256, 64)
    assert (config.model.vision_final_norm, config.model.text_mlp_norm, config.data.dataset) == (False, "batch", "f30k")
    # The official preprocessing: ImageNet statistics, its keep count and views, stretched images, untruncated captions.
    assert (config.model.pixel_stats, config.model.keep_count, config.model.view_sampling) == ("imagenet", "tokens", "nearest")
    assert (config.data.resize, config.model.text.max_len) == ("stretch", 0)
    assert (checkpoint["epoch"], checkpoint["step"], checkpoint["dev_metrics"]["rsum"]) == (12, 3400, 512.5)
    images = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)
    batch = tokenize(["a red circle", "two small green triangles left of a blue square"])
    with torch.no_grad():
        torch.testing.assert_close(imported.encode_image(images), reference.encode_image(images), rtol=0, atol=1e-6)
        torch.testing.assert_close(imported.encode_text(*batch), reference.encode_text(*batch), rtol=0, atol=1e-6)


def test_the_official_vit_skips_its_final_layernorm_and_normalises_the_text_mlp_over_the_batch(bert_folder):
    model = reference_model(bert_folder)
    assert isinstance(model.text_encoder.mlp.net[1], torch.nn.BatchNorm1d)
    with torch.no_grad():
        model.image_encoder.backbone.layernorm.weight.mul_(3.0)  # unused: embeddings must not change
        images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
        before = model.encode_image(images)
        model.image_encoder.final_norm = True
        assert not torch.allclose(model.encode_image(images), before)


def test_numpy_values_in_a_checkpoint_are_refused_unless_trusted(tmp_path, bert_folder):
    source = save_official(tmp_path / "model_best.pth", reference_model(bert_folder), best_rsum=np.float64(512.5))
    with pytest.raises(AvseError, match=r"model_best\.pth: refused to load: it holds pickled Python objects \(numpy.*--trust-checkpoint"):
        pipeline.import_checkpoint(source, REPO / "params.yaml", [f"model.text.name={bert_folder}"], out_dir=tmp_path / "models")
    assert not (tmp_path / "models").exists()
    pipeline.import_checkpoint(source, REPO / "params.yaml", [f"model.text.name={bert_folder}"], trust=True, out_dir=tmp_path / "models")
    assert (tmp_path / "models" / "best.pt").exists()


def test_a_checkpoint_that_does_not_fit_the_configured_model_writes_nothing(tmp_path, bert_folder):
    source = save_official(tmp_path / "model_best.pth", reference_model(bert_folder))
    with pytest.raises(AvseError, match=r"parameters of the wrong shape for vit-tiny: image_encoder.proj.weight \(256, 128\) \(expected \(512, 128\)\)"):
        pipeline.import_checkpoint(source, REPO / "params.yaml", [f"model.text.name={bert_folder}", "model.embed_size=512"],
                                   out_dir=tmp_path / "models")
    assert not (tmp_path / "models").exists()


def test_an_unknown_module_is_named(tmp_path):
    with pytest.raises(AvseError, match=r"1 parameters of no known official module: cross_net.weight"):
        official.convert_state_dict({"cross_net.weight": torch.zeros(1), "txt_enc.fc.weight": torch.zeros(1)}, "vit")


def test_swin_blocks_in_transformers_4_names_map_onto_this_swin(tmp_path):
    _, swin = backbones.build(BackboneConfig(name="swin-tiny", init="random"), "model.vision", ("swin",), input_res=64)
    state = {f"img_enc.visual_encoder.{legacy(k, LEGACY_SWIN)}": v for k, v in swin.state_dict().items()}
    state["img_enc.visual_encoder.encoder.layers.0.blocks.0.attention.self.relative_position_index"] = torch.zeros(16, 16)
    converted = official.convert_state_dict(state, "swin")
    assert set(converted) == {f"image_encoder.backbone.{k}" for k in swin.state_dict()}


def write_photos(folder: Path) -> list[Path]:
    """Photo-sized JPEGs (500 x 375, 375 x 500, 500 x 333) of smooth random colour fields with a little grain."""
    rng = np.random.default_rng(0)
    paths = []
    for i, (width, height) in enumerate([(500, 375), (375, 500), (500, 333)]):
        coarse = rng.integers(0, 256, (6, 8, 3)).astype(np.float32)
        field = cv2.resize(coarse, (width, height), interpolation=cv2.INTER_CUBIC) + rng.normal(0, 8, (height, width, 3))
        paths.append(folder / f"{i}.jpg")
        cv2.imwrite(str(paths[-1]), np.clip(field, 0, 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, 90])
    return paths


IMAGENET_MEAN, IMAGENET_STD = np.array([0.485, 0.456, 0.406], np.float32), np.array([0.229, 0.224, 0.225], np.float32)


def official_resized(path: Path, img_res: int) -> np.ndarray:
    """The official `_process_image` at evaluation, before normalising: imageio's (Pillow's) decode, float32, the
    whole image resized by cv2 to `img_res` x `img_res` (INTER_LINEAR, each side its own scale). `[R, R, 3]`."""
    image = np.array(Image.open(path)).astype(np.float32)
    height, width = image.shape[:2]
    return cv2.resize(image, None, None, fx=img_res / width, fy=img_res / height, interpolation=cv2.INTER_LINEAR)


def official_view_patches(side: int, num_tokens: int, centre: torch.Tensor) -> torch.Tensor:
    """`radial_bias_sampling_groups` around `centre` (official integer patch coordinates `[2]`; it draws them with
    torch.randint, here they are given): the int(0.9 x num_tokens) patches of highest exp(-4 d) / sum, equal weights
    in index order (the official topk leaves their order unspecified). `[new_n]` patch indices."""
    coords = torch.stack(torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij"), dim=-1).reshape(-1, 2).float()
    weights = torch.exp(-4.0 * torch.norm(coords - centre, dim=-1))  # [P]
    return torch.sort(weights / weights.sum(), descending=True, stable=True).indices[: int(num_tokens * 0.9)]


def official_image_embedding(model, pixels: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """`VisionTransEncoder.forward` of the official code in eval mode, on `model`'s weights: per view the class token
    and `official_view_patches`, the encoder without the final LayerNorm, fc, GPO over all tokens, x / (|x| + 1e-8).

    pixels `[B, 3, R, R]` normalised; centres `[V, 2]`. Returns `[B, V * E]`.
    """
    vit, encoder = model.image_encoder.backbone, model.image_encoder
    tokens = vit.embeddings(pixels, interpolate_pos_encoding=True)  # [B, 1 + P, hidden]
    side = round((tokens.shape[1] - 1) ** 0.5)
    views = []
    for centre in centres:
        hidden = torch.cat([tokens[:, :1], tokens[:, 1 + official_view_patches(side, tokens.shape[1], centre)]], dim=1)
        for layer in vit.layers:
            hidden = layer(hidden)
        features = encoder.proj(hidden)
        pooled, _ = encoder.gpo(features, torch.full((features.size(0),), features.size(1)))
        views.append(pooled / (pooled.norm(dim=-1, keepdim=True) + 1e-8))
    return torch.cat(views, dim=1)


def test_imported_embeddings_of_jpeg_files_match_the_official_preprocessing_and_views(tmp_path, bert_folder):
    # 112 px with 8 px patches: 14 x 14 patches, where the official count keeps 177 of 196 at evaluation, not 176.
    options = {**OPTIONS, "img_res": 112}
    reference = reference_model(bert_folder, options)
    source = save_official(tmp_path / "model_best.pth", reference, options)
    pipeline.import_checkpoint(source, REPO / "params.yaml", [f"model.text.name={bert_folder}"], out_dir=tmp_path / "models")
    imported, config, _, _ = load_trained(tmp_path / "models")
    paths = write_photos(tmp_path)
    split = PreparedSplit(name="test", captions=[], caption_image=np.zeros(0, np.int64), image_ids=np.arange(len(paths)),
                          image_paths=[str(p) for p in paths], cache=None)
    ours = torch.stack([ImageDataset(split, config.data.img_res, config.data.resize)[i][0] for i in range(len(paths))])
    theirs = np.stack([official_resized(p, 112) for p in paths])  # [N, R, R, 3] float32
    # The one pixel difference left: this project resizes uint8 (cv2's fixed point), the official code float32.
    assert np.abs(ours.permute(0, 2, 3, 1).numpy() - theirs).max() < 1.0
    official_pixels = torch.from_numpy((theirs / 255 - IMAGENET_MEAN) / IMAGENET_STD).permute(0, 3, 1, 2)
    # This project's fixed evaluation centres, in the official coordinates (half a patch lower).
    centres = view_centres(1, 2, 14, 14, train=False)[0] - 0.5
    with torch.no_grad():
        _, kept = imported.image_encoder.view_tokens(imported.image_encoder.normalize_pixels(ours))  # [N, V, 177]
        expected = torch.stack([official_view_patches(14, 197, c).sort().values for c in centres])  # [V, 177]
        assert kept.shape == (len(paths), 2, 177) and torch.equal(kept, expected.expand_as(kept))

        def mean_view_cosine() -> float:
            embedded = imported.encode_image(ours).view(len(paths), 2, -1)
            official = official_image_embedding(reference, official_pixels, centres).view(len(paths), 2, -1)
            return torch.nn.functional.cosine_similarity(embedded, official, dim=-1).mean().item()

        assert mean_view_cosine() >= 0.999
        imported.image_encoder.pixel_mean.fill_(0.5), imported.image_encoder.pixel_std.fill_(0.5)  # ViT's own statistics
        assert mean_view_cosine() < 0.99


def test_the_readme_import_path_embeds_whole_jpeg_files_at_the_checkpoints_resolution(tmp_path, bert_folder, monkeypatch):
    """`avse prepare $F30K $JPEG`, `avse import-checkpoint ...`, `avse embed $F30K $JPEG` on real-sized photos."""
    monkeypatch.chdir(tmp_path)
    options = {**OPTIONS, "img_res": 112}
    source = save_official(tmp_path / "model_best.pth", reference_model(bert_folder, options), options)
    paths = write_photos(tmp_path)  # 500 x 375 and the like
    captions = tmp_path / "f30k"
    captions.mkdir()
    (captions / "test_caps.txt").write_text("".join(f"photo {i}, caption {k}\n" for i in range(len(paths)) for k in range(5)))
    (captions / "test_ids.txt").write_text("".join(f"{i}\n" for i in range(len(paths)) for _ in range(5)))
    (captions / "id_mapping.json").write_text(json.dumps({str(i): path.name for i, path in enumerate(paths)}))
    overrides = ["data.dataset=f30k", f"data.root={captions}", f"data.images={tmp_path}", "data.cache_res=0",
                 f"model.text.name={bert_folder}", "tracking.enabled=false",
                 "train.precision=fp32"]  # `auto` embeds in bf16 on a CPU with bf16 units; the reference is fp32
    config = load_config(REPO / "params.yaml", overrides)
    pipeline.prepare(config)
    pipeline.import_checkpoint(source, REPO / "params.yaml", overrides, out_dir=tmp_path / "models")
    pipeline.embed(config)

    imported, trained, _, _ = load_trained(tmp_path / "models")
    whole = torch.stack([torch.from_numpy(resize_square(load_rgb(p), 112, "stretch")).permute(2, 0, 1) for p in paths])
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # the device the embed stage took
    with torch.no_grad():
        expected = imported.to(device).encode_image(whole.to(device)).cpu()
    embedded = torch.load(tmp_path / "embeddings" / "test" / "images.pt")["embeddings"]
    assert trained.data.img_res == 112
    if device.type == "cpu":
        assert torch.equal(embedded, expected)
    else:  # the stage's batches are smaller: GPU kernels chosen by shape (TF32 convolutions by default) sum in other orders
        torch.testing.assert_close(embedded, expected, rtol=0, atol=5e-3)
    with pytest.raises(ConfigError, match=r"^data\.cache_res: 64 is smaller than data\.img_res: 112; prepare with -S data\.cache_res=112"):
        pipeline.embed(load_config(REPO / "params.yaml", [*overrides, "data.cache_res=64"]))
