"""The JSON bodies the API answers with, beyond errors (which are :mod:`service.errors`')."""

from __future__ import annotations

from pydantic import BaseModel, Field

__all__ = ["ModelCard", "ModelsResponse"]


class ModelCard(BaseModel):
    architecture: dict[str, int | bool] = Field(description="MPRNet constructor values")
    parameters: int
    weights_file: str = Field(description="checkpoint file name")
    weights_sha256: str
    device: str = Field(description="the first of devices")
    devices: list[str] = Field(description="every device holding a copy of this model, one inference worker each")
    precision: str
    tile_size: int
    tile_overlap: int
    backend: str = Field(description="what runs the network: torch or openvino")


class ModelsResponse(BaseModel):
    ready: bool
    workers: list[str] = Field(description="the inference workers, named as in the batch metrics' device label")
    max_batch_size: int
    max_batch_wait_ms: float
    max_queued_tiles: int
    models: dict[str, ModelCard] = Field(description="per task; only tasks whose model has loaded")
