"""A complete custom model, the smallest useful one: upper-cases text, in batches.

Serve it with `ASYNCINFER_MODELS=examples/models.toml asyncinfer up` from the repository root,
then run `python examples/call.py`.
"""

from __future__ import annotations

from pydantic import BaseModel, Field

from asyncinfer import InferenceModel, ServingOptions, worker_context


class UpperInput(BaseModel):
    text: str = Field(min_length=1, max_length=1000)


class UpperOutput(BaseModel):
    text: str
    worker: str


class UpperModel(InferenceModel):
    Input = UpperInput
    Output = UpperOutput
    options = ServingOptions(max_batch_size=16, max_latency_ms=50)

    def load(self, device: str) -> None:
        self.worker = worker_context().worker_name  # where this process runs

    def preprocess(self, item: UpperInput) -> str:
        return item.text

    def predict(self, batch: list[str]) -> list[str]:
        return [text.upper() for text in batch]

    def postprocess(self, result: str) -> UpperOutput:
        return UpperOutput(text=result, worker=self.worker)
