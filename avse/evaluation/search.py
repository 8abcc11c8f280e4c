"""Interactive retrieval over an embedding index: top-k images for a text, top-k captions for an image."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from avse.data.dataset import PreparedSplit, to_tensor
from avse.data.images import Resize, load_rgb, resize_square
from avse.data.tokenizer import CaptionTokenizer
from avse.evaluation.embed import encode_captions, encode_images, load_trained
from avse.evaluation.evaluate import Embeddings
from avse.model.avse import AVSE

if TYPE_CHECKING:
    from avse.serving import EmbeddingModel


@dataclass
class Hit:
    index: int  # image position or caption index in the split
    score: float
    text: str  # the caption, or the image path


class SearchIndex:
    def __init__(self, model: AVSE, img_res: int, resize: Resize, tokenize: CaptionTokenizer, embeddings: Embeddings, split: PreparedSplit):
        """`img_res` and `resize`: how the model was trained to see images (its `data.img_res`, `data.resize`)."""
        self.model, self.img_res, self.resize, self.tokenize = model, img_res, resize, tokenize
        self.embeddings, self.split = embeddings, split

    @classmethod
    def load(cls, models_dir: Path, embeddings_dir: Path, split: PreparedSplit) -> "SearchIndex":
        model, trained, tokenize, _ = load_trained(models_dir)
        return cls(model, trained.data.img_res, trained.data.resize, tokenize, Embeddings.load(embeddings_dir), split)

    @classmethod
    def embed(cls, model: "EmbeddingModel", split: PreparedSplit, batch_size: int) -> "SearchIndex":
        """An index of `split` embedded with a loaded MLflow model (`avse.serving`), as the embed stage would."""
        cpu = torch.device("cpu")
        resize = model.trained.data.resize
        images = encode_images(model.model, split, model.img_res, batch_size, cpu, progress=True, resize=resize)
        captions = encode_captions(model.model, split.captions, model.tokenize, batch_size, cpu, progress=True)
        embeddings = Embeddings(images, torch.from_numpy(split.image_ids), captions, torch.from_numpy(split.caption_image), {})
        return cls(model.model, model.img_res, resize, model.tokenize, embeddings, split)

    def text_to_images(self, query: str, k: int) -> list[Hit]:
        """The `k` images scoring highest against the caption `query`."""
        cap = encode_captions(self.model, [query], self.tokenize, 1, torch.device("cpu"))  # [1, Dt]
        with torch.no_grad():
            scores = self.model.similarity(self.embeddings.images, cap)[:, 0]  # [n_images]
        top = scores.topk(min(k, scores.numel()))
        return [Hit(int(i), float(s), self.split.image_paths[i]) for s, i in zip(top.values, top.indices)]

    def image_to_captions(self, image_path: str | Path, k: int) -> list[Hit]:
        """The `k` captions scoring highest against the image file."""
        pixels = to_tensor(resize_square(load_rgb(image_path), self.img_res, self.resize))[None]  # [1, 3, R, R]
        with torch.no_grad():
            img = self.model.encode_image(pixels)  # [1, Di]
            scores = self.model.similarity(img, self.embeddings.captions)[0]  # [n_captions]
        top = scores.topk(min(k, scores.numel()))
        return [Hit(int(j), float(s), self.split.captions[j]) for s, j in zip(top.values, top.indices)]


def render_text_query(query: str, hits: list[Hit], out: Path) -> None:
    """The query as a title over the retrieved images, each with its rank and score."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(hits), figsize=(2.2 * len(hits), 2.8), squeeze=False)
    for rank, (ax, hit) in enumerate(zip(axes[0], hits), start=1):
        ax.imshow(load_rgb(hit.text))
        ax.set_title(f"#{rank}  {hit.score:.3f}", fontsize=9)
        ax.axis("off")
    fig.suptitle(f'"{query}"', fontsize=11)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def render_image_query(image_path: str | Path, hits: list[Hit], out: Path) -> None:
    """The query image beside the retrieved captions with their scores."""
    plt = _pyplot()
    fig, (image_ax, text_ax) = plt.subplots(1, 2, figsize=(9, 3), gridspec_kw={"width_ratios": [1, 2]})
    image_ax.imshow(load_rgb(image_path))
    image_ax.set_title(Path(image_path).name, fontsize=9)
    image_ax.axis("off")
    lines = [f"#{rank}  {hit.score:.3f}  {hit.text}" for rank, hit in enumerate(hits, start=1)]
    text_ax.text(0, 1, "\n".join(lines), va="top", family="monospace", fontsize=9, wrap=True)
    text_ax.axis("off")
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
