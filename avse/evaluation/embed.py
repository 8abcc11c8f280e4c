"""Embedding extraction: every unique image once, every caption once, with the deterministic evaluation views."""

from __future__ import annotations

from pathlib import Path

import torch
from torch import Tensor
from torch.utils.data import DataLoader
from avse.progress import progress as progress_bar

from avse.compute import autocast
from avse.data.dataset import ImageDataset, PreparedSplit
from avse.data.images import Resize
from avse.config import Config
from avse.launch.signals import ignore_stop_signals
from avse.data.tokenizer import CaptionTokenizer, load_tokenizer
from avse.model.avse import AVSE, from_checkpoint
from avse.checkpoint import load_checkpoint


def load_trained(models_dir: Path) -> tuple[AVSE, Config, CaptionTokenizer, dict]:
    """The trained model of `models_dir/best.pt` (in eval mode), the config it was trained with,
    its tokenizer (`models_dir/tokenizer`) and the checkpoint itself."""
    checkpoint = load_checkpoint(models_dir / "best.pt")
    model, trained = from_checkpoint(checkpoint)
    tokenize = CaptionTokenizer(load_tokenizer(models_dir / "tokenizer"), trained.model.text.max_len)
    return model, trained, tokenize, checkpoint


@torch.no_grad()
def encode_images(
    model: AVSE, split: PreparedSplit, resolution: int, batch_size: int, device: torch.device,
    dtype: torch.dtype = torch.float32, num_workers: int = 0, progress: bool = False, *, resize: Resize,
) -> Tensor:
    """`[n_images, views * embed_size]` float32 on the CPU, in the split's image order; each whole image made
    square per `resize` (`data.resize`), never augmented."""
    was_training = model.training
    model.eval()
    # Pinned batches make the copies to a GPU asynchronous; the embeddings stay there until the end, so that the
    # host never waits for a batch before it queues the next.
    loader = DataLoader(ImageDataset(split, resolution, resize), batch_size=batch_size, num_workers=num_workers,
                        pin_memory=device.type == "cuda", worker_init_fn=ignore_stop_signals)
    chunks = []
    for images, _ in progress_bar(loader, desc=f"images {split.name}", disable=not progress, unit="batch"):
        with autocast(device, dtype):
            chunks.append(model.encode_image(images.to(device, non_blocking=True)).float())
    model.train(was_training)
    return torch.cat(chunks).cpu()


@torch.no_grad()
def encode_captions(
    model: AVSE, captions: list[str], tokenize: CaptionTokenizer, batch_size: int, device: torch.device,
    dtype: torch.dtype = torch.float32, progress: bool = False,
) -> Tensor:
    """`[n_captions, embed_size]` float32 on the CPU, in caption order."""
    was_training = model.training
    model.eval()
    chunks = []
    for start in progress_bar(range(0, len(captions), batch_size), desc="captions", disable=not progress, unit="batch"):
        input_ids, attention_mask = tokenize(captions[start : start + batch_size])
        with autocast(device, dtype):
            chunks.append(model.encode_text(input_ids.to(device), attention_mask.to(device)).float())
    model.train(was_training)
    return torch.cat(chunks).cpu()
