"""TorchServe handler for every Fashion-MNIST variant (full, pruned, int8, distilled).

A thin BaseHandler subclass on TorchServe's seams: `preprocess` decodes each request, `inference` runs the model
once on the batch's good requests, `postprocess` formats each answer, and `handle` chains them and records
`HandlerTime` as BaseHandler does (TorchServe's service adds `PredictionTime` around it). On top of that, what a
production endpoint needs: the weights are checked against their model card before the first request, the
worker's torch thread count comes from the archive's `model-config.yaml`, class names come from the archive's
`index_to_name.json` (TorchServe's label-mapping convention), and bad input fails only its own request (HTTP
400 with a message) while the rest of the batch is answered. Unlike BaseHandler.handle, the `describe` and
`explain` request headers are not honoured: any client could set them, and either turns the whole batch into
something else (a wrong-length answer that fails every request in it with 503).

Accepted inputs, per request (requests in one batch may mix them):
  * an image body: PNG, JPEG, GIF, BMP, TIFF, WebP or PPM, any colour mode, up to 384×384 pixels (a baseline
    JPEG up to 2048×2048) and 1 MB; of an animation, the first frame. It is made to look like the training data:
    grayscale, inverted when its background is light (Fashion-MNIST has light garments on black), scaled so its
    longer side is 28 px and centred on black.
  * JSON `{"data": PIXELS}`: a 28×28 nested list or 784 numbers, pixel intensities in [0, 255] with the
    garment light on a dark background, exactly like the data set's uint8 pixels.
  * JSON `{"data": "<base64 image>"}` (or `"image"`): an image, as above.
  * KServe v2 (Open Inference Protocol) JSON: `{"inputs": [{"name", "shape": [1, 28, 28], "datatype": "FP32",
    "data": [...]}]}` (or datatype BYTES, shape [1], with a base64 image); answered in the v2 response format.
  * optional `"topk"` (JSON field, form field or gRPC input key): how many classes to return (default 3).

Answer: {"label", "class", "topk": [{"label", "class", "probability"}...], "model": {"name", "version",
"variant"}}. A v2 answer: {"id", "model_name", "model_version", "outputs": [label INT64 [1], class BYTES [1],
probabilities FP32 [1, 10]]}. An error (either protocol): {"error": {"code": 400, "type": "InvalidInput",
"message": ...}, "model": {...}}, with HTTP status 400 on REST; gRPC ignores per-request status codes, so there
the body is the contract. Messages are at most 300 characters and quote no unbounded input. REST answers carry
`X-Batch-Size`: how many requests shared the batch.

Cost: every request's decoding is bounded before it starts (see request_decoding.py): `make chaos` measures each
bad-input kind's (and each worst valid image's) handler time and worker memory and asserts a bound on both.
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

import open_inference
import torch
from invalid_input import InvalidInput, Refusal, clip, error_body
from request_decoding import Request, decode_request
from ts.torch_handler.base_handler import BaseHandler

import fashion_cnn

log = logging.getLogger(__name__)

CARD_FILE = "card.json"
LABELS_FILE = "index_to_name.json"
# The HTTP reason phrase stays plain ASCII on one line; what is wrong goes in the JSON body.
BAD_REQUEST = "Bad Request"
# TorchServe's worker json.loads every application/json body before the handler sees it unless this is "false"
# (read per request in ts/protocol/otf_message_handler.py). Parsing a 6 MB list of numbers that way costs ~60 MB
# of Python objects no check of ours could prevent; off, the handler counts a body's values before parsing it.
# Set in the worker's own environment, so it holds however TorchServe was started (each worker serves one model).
DECODE_INPUT_ENV = "TS_DECODE_INPUT_REQUEST"
CPU_TIME_METRIC = "HandlerCPUTime"


# What `inference` hands `postprocess` for each request of the batch: the request and its class probabilities.
# (A tuple, not a class: TorchServe refuses a handler module that defines more than one class.)
Prediction = tuple[Request, torch.Tensor]


class FashionHandler(BaseHandler):
    """Serves one variant; which one, and how to load it, is in the card packed beside the weights."""

    def initialize(self, context: Any) -> None:
        model_dir = context.system_properties.get("model_dir")
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
        self.model = fashion_cnn.load_model(weights, self.card["format"])
        self.classes = self._class_names(os.path.join(model_dir, LABELS_FILE))
        self.model_info = {
            "name": context.model_name,
            "version": str(context.manifest["model"].get("modelVersion", "")),
            "variant": self.card["variant"],
        }
        os.environ[DECODE_INPUT_ENV] = "false"
        self.initialized = True
        log.info("loaded %s (%s, sha256 verified) with %d torch threads", self.model_info, weights, threads)

    def _class_names(self, path: str) -> list[str]:
        """index_to_name.json's names, one per model output (checked with a warm-up forward pass)."""
        with open(path) as handle:
            mapping = json.load(handle)
        with torch.inference_mode():
            outputs = self.model(fashion_cnn.normalize(torch.zeros(1, fashion_cnn.IMAGE_SIZE, fashion_cnn.IMAGE_SIZE),
                                                       self.dataset)).shape[1]
        if not isinstance(mapping, dict) or set(mapping) != {str(index) for index in range(outputs)} or not all(
                isinstance(name, str) for name in mapping.values()):
            raise RuntimeError(f"{path} must name each of the model's {outputs} classes (keys '0'..'{outputs - 1}')")
        return [mapping[str(index)] for index in range(outputs)]

    def handle(self, data: list[dict[str, Any]], context: Any) -> list[dict[str, Any]]:
        """N requests in, N answers out; a bad request gets its own 400 and never fails the batch."""
        start, cpu_start = time.time(), time.process_time()
        self.context = context
        answers = self.postprocess(self.inference(self.preprocess(data)))
        # HandlerTime as BaseHandler.handle records it (a [METRICS] line in ts_log.log with the batch's request
        # ids, and the HandlerTime gauge in Prometheus mode). HandlerCPUTime beside it tells a batch that cost
        # much from one that waited for a busy core; it reaches Prometheus only if declared in the metrics YAML,
        # the log line is always written.
        context.metrics.add_time("HandlerTime", round((time.time() - start) * 1000, 2), None, "ms")
        context.metrics.add_time(CPU_TIME_METRIC, round((time.process_time() - cpu_start) * 1000, 2), None, "ms")
        return answers

    def preprocess(self, data: list[dict[str, Any]]) -> list[Request | Refusal]:
        decoded: list[Request | Refusal] = []
        for index, row in enumerate(data):
            try:
                decoded.append(decode_request(row, len(self.classes)))
            except InvalidInput as error:
                decoded.append(Refusal(str(error)))
            except Exception as error:  # an input we failed to foresee must still fail alone, not the batch
                log.exception("request %d of the batch could not be decoded", index)
                decoded.append(Refusal(f"cannot process this request: {type(error).__name__}: {clip(str(error), 200)}"))
        return decoded

    def inference(self, data: list[Request | Refusal], *args: Any, **kwargs: Any) -> list[Prediction | Refusal]:
        """One forward pass over the batch's good requests; refusals pass through in their places."""
        good = [item for item in data if isinstance(item, Request)]
        if not good:
            return [item for item in data if isinstance(item, Refusal)]
        batch = torch.stack([request.pixels.to(torch.float32) for request in good])
        with torch.inference_mode():
            probabilities = torch.softmax(self.model(fashion_cnn.normalize(batch, self.dataset)).float(), dim=1)
        rows = iter(probabilities)
        return [(item, next(rows)) if isinstance(item, Request) else item for item in data]

    def postprocess(self, data: list[Prediction | Refusal]) -> list[dict[str, Any]]:
        answers = []
        for index, item in enumerate(data):
            # How many requests shared this batch: lets clients and load tests see batching at work (REST).
            self.context.set_response_header(index, "X-Batch-Size", str(len(data)))
            if isinstance(item, Refusal):
                self.context.set_response_status(400, BAD_REQUEST, index)
                answers.append(error_body(item.message, self.model_info))
            elif item[0].v2_id is not None:
                answers.append(self.v2_answer(item))
            else:
                answers.append(self.answer(item))
        return answers

    def answer(self, prediction: Prediction) -> dict[str, Any]:
        request, probabilities = prediction
        values, indices = probabilities.topk(request.topk)
        ranked = [
            {"label": int(label), "class": self.classes[int(label)], "probability": round(float(p), 6)}
            for p, label in zip(values, indices, strict=True)
        ]
        return {"label": ranked[0]["label"], "class": ranked[0]["class"], "topk": ranked, "model": self.model_info}

    def v2_answer(self, prediction: Prediction) -> dict[str, Any]:
        request, probabilities = prediction
        label = int(probabilities.topk(1).indices[0])
        outputs = [
            open_inference.Tensor("label", "INT64", (1,), [label]),
            open_inference.Tensor("class", "BYTES", (1,), [self.classes[label]]),
            open_inference.Tensor("probabilities", "FP32", (1, len(self.classes)),
                                  [round(float(p), 6) for p in probabilities]),
        ]
        return open_inference.response(self.model_info["name"], self.model_info["version"], request.v2_id or "",
                                       outputs)
