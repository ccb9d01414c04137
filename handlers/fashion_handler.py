"""TorchServe handler for every Fashion-MNIST variant (full, pruned, int8, distilled).

A thin BaseHandler subclass: TorchServe's own `initialize` flow and batching, with three additions a
production endpoint needs — the weights are checked against their model card before the first request, the
worker's torch thread count comes from the archive's `model-config.yaml`, and bad input fails only its own
request (HTTP 400 with a message) while the rest of the batch is answered.

Accepted inputs, per request (requests in one batch may mix them):
  * an image body: PNG, JPEG or anything Pillow reads, any size and colour mode. It is made to look like the
    training data: grayscale, inverted when its background is light (Fashion-MNIST has light garments on
    black), scaled so its longer side is 28 px and centred on black.
  * JSON `{"data": PIXELS}`: a 28×28 nested list or 784 numbers, pixel intensities in [0, 255] with the
    garment light on a dark background, exactly like the data set's uint8 pixels.
  * JSON `{"data": "<base64 image>"}` (or `"image"`): an image, as above.
  * KServe v2 (Open Inference Protocol) JSON: `{"inputs": [{"name", "shape": [1, 28, 28], "datatype": "FP32",
    "data": [...]}]}` (or datatype BYTES with a base64 image); answered in the v2 response format.
  * optional `"topk"` (JSON field, form field or gRPC input key): how many classes to return (default 3).

Answer: {"label", "class", "topk": [{"label", "class", "probability"}...], "model": {"name", "version",
"variant"}}. An error: {"error": {"code": 400, "type": "InvalidInput", "message": ...}, "model": {...}},
with HTTP status 400 on REST; gRPC ignores per-request status codes, so there the body is the contract.
"""

from __future__ import annotations

import json
import logging
import os
from typing import Any

import torch
from request_decoding import InvalidInput, Request, decode_request, error_body
from ts.torch_handler.base_handler import BaseHandler

import fashion_cnn

log = logging.getLogger(__name__)

CARD_FILE = "card.json"
# The HTTP reason phrase stays plain ASCII on one line; what is wrong goes in the JSON body.
BAD_REQUEST = "Bad Request"


class FashionHandler(BaseHandler):
    """Serves one variant; which one, and how to load it, is in the card packed beside the weights."""

    def initialize(self, context: Any) -> None:
        properties = context.system_properties
        model_dir = properties.get("model_dir")
        with open(os.path.join(model_dir, CARD_FILE)) as handle:
            self.card = json.load(handle)
        weights = os.path.join(model_dir, context.manifest["model"]["serializedFile"])
        actual = fashion_cnn.sha256_file(weights)
        if actual != self.card["sha256"]:
            raise RuntimeError(f"{weights}: sha256 {actual} does not match its card ({self.card['sha256']})")
        handler_config = (context.model_yaml_config or {}).get("handler", {})
        threads = int(handler_config.get("threads", 1))
        torch.set_num_threads(threads)
        self.dataset = self.card["dataset"]
        self.classes = fashion_cnn.DATASETS[self.dataset].classes
        self.model = fashion_cnn.load_model(weights, self.card["format"])
        self.model_info = {
            "name": context.model_name,
            "version": str(context.manifest["model"].get("modelVersion", "")),
            "variant": self.card["variant"],
        }
        self.initialized = True
        log.info("loaded %s (%s, sha256 verified) with %d torch threads", self.model_info, weights, threads)

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[dict[str, Any]]:
        """N requests in, N answers out; a bad request gets its own 400 and never fails the batch."""
        answers: list[dict[str, Any] | None] = [None] * len(data)
        good: list[tuple[int, Request]] = []
        for index, row in enumerate(data):
            # How many requests shared this batch: lets clients and load tests see batching at work (REST).
            context.set_response_header(index, "X-Batch-Size", str(len(data)))
            try:
                good.append((index, decode_request(row, len(self.classes))))
            except InvalidInput as error:
                answers[index] = error_body(str(error), self.model_info)
                context.set_response_status(400, BAD_REQUEST, index)
            except Exception as error:  # an input we failed to foresee must still fail alone, not the batch
                log.exception("request %d of the batch could not be decoded", index)
                message = f"cannot process this request: {type(error).__name__}: {str(error)[:200]}"
                answers[index] = error_body(message, self.model_info)
                context.set_response_status(400, BAD_REQUEST, index)
        if good:
            batch = torch.stack([request.pixels.to(torch.float32) for _, request in good])
            with torch.inference_mode():
                probabilities = torch.softmax(self.model(fashion_cnn.normalize(batch, self.dataset)).float(), dim=1)
            for (index, request), row_probabilities in zip(good, probabilities, strict=True):
                answers[index] = self.describe(row_probabilities, request)
        return [answer if answer is not None else {} for answer in answers]

    def describe(self, probabilities: torch.Tensor, request: Request) -> dict[str, Any]:
        values, indices = probabilities.topk(request.topk)
        ranked = [
            {"label": int(label), "class": self.classes[int(label)], "probability": round(float(p), 6)}
            for p, label in zip(values, indices, strict=True)
        ]
        if request.v2_id is not None:
            return {
                "id": request.v2_id,
                "model_name": self.model_info["name"],
                "model_version": self.model_info["version"],
                "outputs": [
                    {"name": "label", "shape": [1], "datatype": "INT64", "data": [ranked[0]["label"]]},
                    {"name": "class", "shape": [1], "datatype": "BYTES", "data": [ranked[0]["class"]]},
                    {"name": "probabilities", "shape": [1, len(self.classes)], "datatype": "FP32",
                     "data": [round(float(p), 6) for p in probabilities]},
                ],
            }
        return {"label": ranked[0]["label"], "class": ranked[0]["class"], "topk": ranked, "model": self.model_info}
