"""V2 request/response shapes, for the OpenAPI document only.

Requests are not parsed through these models: `codecs.py` checks them against the model's own signature,
which is both stricter and much cheaper. Field names and nesting follow the Open Inference Protocol spec.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, Field

TensorData = list[Any]


class RequestInput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: TensorData = Field(description="Flat, row-major values; omitted when parameters.binary_data_size is set.")


class RequestOutput(BaseModel):
    name: str
    parameters: dict[str, Any] | None = None


class InferenceRequest(BaseModel):
    id: str | None = None
    parameters: dict[str, Any] | None = None
    inputs: list[RequestInput]
    outputs: list[RequestOutput] | None = None


class ResponseOutput(BaseModel):
    name: str
    shape: list[int]
    datatype: str
    parameters: dict[str, Any] | None = None
    data: TensorData


class InferenceResponse(BaseModel):
    model_name: str
    model_version: str | None = None
    id: str | None = None
    parameters: dict[str, Any] | None = None
    outputs: list[ResponseOutput]


class ErrorResponse(BaseModel):
    error: str


class ServerMetadata(BaseModel):
    name: str
    version: str
    extensions: list[str]


class TensorMetadata(BaseModel):
    name: str
    datatype: str
    shape: list[int]


class ModelMetadata(BaseModel):
    name: str
    versions: list[str] | None = None
    platform: str
    inputs: list[TensorMetadata] | None = None
    outputs: list[TensorMetadata] | None = None
    aliases: dict[str, str] | None = Field(default=None, description="gatewatch extension: alias -> version")


class LiveResponse(BaseModel):
    live: bool


class ReadyResponse(BaseModel):
    ready: bool


class ModelReadyResponse(BaseModel):
    name: str
    ready: bool


class Feedback(BaseModel):
    id: str = Field(description="The x-request-id of the request this feedback refers to.")
    label: Any = Field(default=None, description="Ground truth for the request.")
    reward: float | None = Field(default=None, description="A reward for the answer (bandit routes).")


class FeedbackAccepted(BaseModel):
    accepted: bool
