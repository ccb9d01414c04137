"""Send one image or JSON request to TorchServe over REST or gRPC, with the inference token."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import grpc
import requests

from serving import protos
from serving.server import Instance

IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".bmp": "image/bmp",
                  ".gif": "image/gif", ".tif": "image/tiff", ".tiff": "image/tiff", ".webp": "image/webp"}


def content_type_of(path: Path) -> str:
    if path.suffix.lower() == ".json":
        return "application/json"
    return IMAGE_SUFFIXES.get(path.suffix.lower(), "application/octet-stream")


def prediction_path(model: str, version: str | None) -> str:
    return f"/predictions/{model}" + (f"/{version}" if version else "")


def predict_rest(instance: Instance, model: str, body: bytes, content_type: str, version: str | None = None,
                 topk: int | None = None, timeout: float = 30.0) -> tuple[int, Any]:
    """POST one request; with `topk`, JSON gets a "topk" field and an image goes as a multipart form
    (fields "data" and "topk"), since TorchServe passes no query parameters to /predictions."""
    url = instance.inference_url + prediction_path(model, version)
    if topk is not None and content_type == "application/json":
        body = json.dumps({**json.loads(body), "topk": topk}).encode()
    if topk is not None and content_type != "application/json":
        response = requests.post(url, files={"data": ("image", body, content_type)}, data={"topk": str(topk)},
                                 headers=instance.headers(), timeout=timeout)
    else:
        response = requests.post(url, data=body, headers={**instance.headers(), "Content-Type": content_type},
                                 timeout=timeout)
    try:
        return response.status_code, response.json()
    except ValueError:
        return response.status_code, response.text


def predict_grpc(instance: Instance, model: str, body: bytes, version: str | None = None,
                 topk: int | None = None, timeout: float = 30.0) -> Any:
    """The handler's JSON answer; errors travel in the body (TorchServe's gRPC ignores per-request codes)."""
    inference_pb2 = protos.load("inference_pb2")
    inference_pb2_grpc = protos.load("inference_pb2_grpc")
    inputs = {"data": body}
    if topk is not None:
        inputs["topk"] = str(topk).encode()
    with grpc.insecure_channel(instance.grpc_target) as channel:
        stub = inference_pb2_grpc.InferenceAPIsServiceStub(channel)
        request = inference_pb2.PredictionsRequest(model_name=model, model_version=version or "", input=inputs)
        response = stub.Predictions(request, metadata=[("authorization", f"Bearer {instance.token()}")],
                                    timeout=timeout)
    return json.loads(response.prediction)
