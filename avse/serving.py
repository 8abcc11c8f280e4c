"""A trained model as an MLflow model: a `pyfunc` that embeds captions and images, loadable with no project checkout.

    model = mlflow.pyfunc.load_model("models:/avse-synthetic-vit-tiny-p16-64@champion")
    captions = model.predict(pd.DataFrame({"caption": ["a red circle"]}))          # embedding [embed_size]
    images = model.predict(pd.DataFrame({"image": [Path("a.jpg").read_bytes()]}))  # embedding [views * embed_size]

Each call embeds one kind: a frame with a `caption` column (text) or an `image` column
(encoded image files: JPEG, PNG, ...). The result has one `embedding` row per input row;
score image against caption embeddings with `avse.model.similarity.block_similarity`
and the `block_dim` and `matching` of the model's metadata, or call `similarity`.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from mlflow.pyfunc import PythonModel

from avse.errors import AvseError

ARTIFACT = "trained"  # the artifact holding best.pt and tokenizer/
MODEL_NAME = "model"  # the logged model's name in its run


BATCH = 256  # inputs encoded at once


class EmbeddingModel(PythonModel):
    """The pyfunc wrapper: `load_context` rebuilds the trained model, `predict` embeds a frame."""

    def load_context(self, context) -> None:
        from avse.evaluation.embed import load_trained

        self.model, self.trained, self.tokenize, _ = load_trained(Path(context.artifacts[ARTIFACT]))

    @property
    def img_res(self) -> int:
        return self.trained.data.img_res

    def predict(self, context, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """`model_input` with a `caption` or an `image` column -> a frame with an `embedding` column (lists of floats)."""
        columns = {"caption", "image"} & set(model_input.columns)
        if len(columns) != 1:
            raise AvseError(f"predict: give a frame with a 'caption' or an 'image' column, got columns {list(model_input.columns)}")
        embeddings = self.embed_captions(model_input["caption"].tolist()) if "caption" in columns else self.embed_images(model_input["image"].tolist())
        return pd.DataFrame({"embedding": [row.tolist() for row in embeddings.numpy()]})

    def embed_captions(self, captions: list[str]) -> torch.Tensor:
        """`[n, embed_size]`."""
        from avse.evaluation.embed import encode_captions

        return encode_captions(self.model, [str(c) for c in captions], self.tokenize, BATCH, torch.device("cpu"))

    @torch.no_grad()
    def embed_images(self, images: list[bytes]) -> torch.Tensor:
        """Encoded image files -> `[n, views * embed_size]`, the same views and pixels as `avse embed`."""
        from avse.data.dataset import to_tensor
        from avse.data.images import decode_rgb, resize_square

        resize = self.trained.data.resize
        pixels = [to_tensor(resize_square(decode_rgb(np.frombuffer(data, dtype=np.uint8), f"image row {i}"), self.img_res, resize))
                  for i, data in enumerate(images)]
        return torch.cat([self.model.encode_image(torch.stack(pixels[i : i + BATCH])).float() for i in range(0, len(pixels), BATCH)])

    def similarity(self, images: torch.Tensor, captions: torch.Tensor) -> torch.Tensor:
        """`[n_images, n_captions]` scores of image against caption embeddings."""
        with torch.no_grad():
            return self.model.similarity(images, captions)


def signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import Array, ColSpec, Schema

    inputs = Schema([ColSpec("string", "caption", required=False), ColSpec("binary", "image", required=False)])
    return ModelSignature(inputs=inputs, outputs=Schema([ColSpec(Array("float"), "embedding")]))


def requirements() -> list[str]:
    """The installed versions of what loading the model needs (local version labels such as `+cpu` dropped)."""
    from importlib.metadata import PackageNotFoundError, version

    found = []
    for package in ("avse", "torch", "transformers", "tokenizers", "opencv-python-headless", "pandas", "numpy", "mlflow"):
        try:
            found.append(f"{package}=={version(package).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return found


def log_model(run_id: str, models_dir: Path, metadata: dict[str, Any]) -> str:
    """Log `models_dir/best.pt` and its tokenizer as the run's MLflow model (to the store `mlflow.set_tracking_uri`
    names); returns the logged model's id."""
    import mlflow.pyfunc
    from mlflow.models import Model

    # The logged model belongs to the active experiment, which must be the run's for `runs:/<id>/model` to find it.
    mlflow.set_experiment(experiment_id=mlflow.MlflowClient().get_run(run_id).info.experiment_id)
    with tempfile.TemporaryDirectory() as tmp:
        trained = Path(tmp) / ARTIFACT
        trained.mkdir()
        shutil.copy2(models_dir / "best.pt", trained / "best.pt")
        shutil.copytree(models_dir / "tokenizer", trained / "tokenizer")
        info = Model.log(artifact_path=None, name=MODEL_NAME, flavor=mlflow.pyfunc, run_id=run_id, python_model=EmbeddingModel(),
                         artifacts={ARTIFACT: str(trained)}, signature=signature(), pip_requirements=requirements(),
                         metadata=metadata)
    return info.model_id


def load_model(uri: str, tracking_uri: str) -> EmbeddingModel:
    """The `EmbeddingModel` behind a model URI (`models:/<name>@<alias>`, `runs:/<id>/model`, `models:/<model id>`)
    in the store and registry at `tracking_uri`."""
    try:
        import mlflow.pyfunc

        mlflow.set_tracking_uri(tracking_uri)
        mlflow.set_registry_uri(tracking_uri)
        loaded = mlflow.pyfunc.load_model(uri)
    except Exception as err:  # MlflowException, OSError: a missing model, an unreachable store
        raise AvseError(f"--model: cannot load {uri} ({str(err).splitlines()[0][:200]})") from None
    model = loaded.unwrap_python_model()
    if not isinstance(model, EmbeddingModel):
        raise AvseError(f"--model: {uri} is not an AVSE model (a {type(model).__name__})")
    return model
