"""TorchServe handler for every Fashion-MNIST variant (full, pruned, int8, distilled).

A thin BaseHandler subclass on TorchServe's seams: `preprocess` decodes each request, `inference` runs the model
once on every image of the batch's good requests, `postprocess` formats each answer, and `handle` chains them
and records `HandlerTime` as BaseHandler does (TorchServe's service adds `PredictionTime` around it). On top of
that, what a production endpoint needs: the weights are checked against their model card before the first
request, the worker's torch thread count comes from the archive's `model-config.yaml`, class names come from the
archive's `index_to_name.json` (TorchServe's label-mapping convention), the Open Inference Protocol signature
(the batch limit, the output names and datatypes) from the archive's `signature.json` (the file the router reads
too), and bad input fails only its own request (HTTP 400 with a message) while the rest of the batch is
answered. Unlike BaseHandler.handle, the `describe` and `explain` request headers are not honoured: any client
could set them, and either turns the whole batch into something else (a wrong-length answer that fails every
request in it with 503).

Accepted inputs, per request (requests in one batch may mix them; request_decoding.py has the exact rules):
  * an image body: PNG, JPEG, GIF, BMP, TIFF, WebP or PPM, any colour mode, up to 384×384 pixels (a baseline
    JPEG up to 2048×2048) and 1 MB; of an animation, the first frame. It is made to look like the training data:
    grayscale, inverted when its background is light (Fashion-MNIST has light garments on black), scaled so its
    longer side is 28 px and centred on black.
  * JSON `{"data": PIXELS}`: a 28×28 nested list or 784 numbers, pixel intensities in [0, 255] with the
    garment light on a dark background, exactly like the data set's uint8 pixels.
  * JSON `{"data": "<base64 image>"}` (or `"image"`): an image, as above.
  * optional `"topk"` (JSON field, form field or gRPC input key): how many classes to return (default 3).
  * Open Inference Protocol (KServe v2), N images in one request (1 <= N <= `max_images` of signature.json):
      - an NPY file body (numpy's .npy, b"\\x93NUMPY..."): dtype |u1 (UINT8) or <f4 (FP32), C order, shape
        [28, 28], [784], [1, 784], [1, 28, 28], [1, 1, 28, 28] (one image) or [N, 28, 28], [N, 784],
        [N, 1, 28, 28]; what the router forwards for a client's numeric tensor;
      - v2 JSON `{"id", "inputs": [{"name", "shape", "datatype": "FP32" or "UINT8", "data": [...]}]}` with
        those shapes (a direct client is limited by the JSON bound: 4096 values, five images), or datatype
        "BYTES", shape [N], one base64 image file per element.

Answer: {"label", "class", "topk": [{"label", "class", "probability"}...], "model": {"name", "version",
"variant"}}. A v2 answer (NPY or v2 JSON), N rows, outputs named and typed by signature.json: {"id" (the
request's, "" for NPY), "model_name", "model_version", "outputs": [label INT64 [N], class BYTES [N],
probabilities FP32 [N, 10]]}. An error (any form): {"error": {"code": 400, "type": "InvalidInput",
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
from request_decoding import ACCEPTED_DATATYPES, Request, decode_request
from ts.torch_handler.base_handler import BaseHandler

import fashion_cnn

log = logging.getLogger(__name__)

CARD_FILE = "card.json"
LABELS_FILE = "index_to_name.json"
SIGNATURE_FILE = "signature.json"
# The v2 outputs this handler can form, by the name signature.json gives them; their datatypes come from there.
OUTPUTS = ("label", "class", "probabilities")
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
        # channels_last where `python -m loadtest.forward_speed` measured it faster (model_configs/<variant>.yaml)
        memory_format = str(handler_config.get("memory_format", fashion_cnn.CONTIGUOUS))
        self.model = fashion_cnn.load_model(weights, self.card["format"], threads, memory_format)
        self.classes = self._class_names(os.path.join(model_dir, LABELS_FILE))
        self.signature = self._signature(os.path.join(model_dir, SIGNATURE_FILE))
        self.max_images: int = self.signature["max_images"]
        self.model_info = {
            "name": context.model_name,
            "version": str(context.manifest["model"].get("modelVersion", "")),
            "variant": self.card["variant"],
        }
        os.environ[DECODE_INPUT_ENV] = "false"
        self.initialized = True
        log.info("loaded %s (%s, sha256 verified) with %d threads, %s", self.model_info, weights, threads,
                 memory_format)

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

    def _signature(self, path: str) -> dict[str, Any]:
        """signature.json, checked against what this handler decodes and answers and against the class count."""
        with open(path) as handle:
            signature: dict[str, Any] = json.load(handle)
        max_images = signature.get("max_images")
        if isinstance(max_images, bool) or not isinstance(max_images, int) or max_images < 1:
            raise RuntimeError(f"{path}: max_images must be a positive integer, got {max_images!r}")
        inputs = signature.get("inputs") or [{}]
        declared = {inputs[0].get("datatype"), *inputs[0].get("also", [])}
        if len(inputs) != 1 or declared != ACCEPTED_DATATYPES:
            raise RuntimeError(f"{path}: one input of datatypes {sorted(ACCEPTED_DATATYPES)} is what this handler "
                               f"decodes, the file declares {len(inputs)} input(s) of {sorted(map(str, declared))}")
        outputs = {output.get("name"): output for output in signature.get("outputs", [])}
        if set(outputs) != set(OUTPUTS) or not all(
                output.get("datatype") and output.get("shape", [])[:1] == [-1] for output in outputs.values()):
            raise RuntimeError(f"{path}: outputs must be {', '.join(OUTPUTS)}, each with a datatype and a shape "
                               f"whose first dimension is -1 (the images); got {sorted(map(str, outputs))}")
        if outputs["probabilities"].get("shape") != [-1, len(self.classes)]:
            raise RuntimeError(f"{path}: probabilities shape {outputs['probabilities'].get('shape')} does not match "
                               f"the {len(self.classes)} classes of {LABELS_FILE} (expected [-1, {len(self.classes)}])")
        return signature

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
                decoded.append(decode_request(row, len(self.classes), self.max_images))
            except InvalidInput as error:
                decoded.append(Refusal(str(error)))
            except Exception as error:  # an input we failed to foresee must still fail alone, not the batch
                log.exception("request %d of the batch could not be decoded", index)
                decoded.append(Refusal(f"cannot process this request: {type(error).__name__}: {clip(str(error), 200)}"))
        return decoded

    def inference(self, data: list[Request | Refusal], *args: Any, **kwargs: Any) -> list[Prediction | Refusal]:
        """One forward pass over every image of the batch's good requests; each request gets its own rows back,
        refusals pass through in their places."""
        good = [item for item in data if isinstance(item, Request)]
        if not good:
            return [item for item in data if isinstance(item, Refusal)]
        batch = torch.cat([request.pixels.to(torch.float32) for request in good])
        with torch.inference_mode():
            probabilities = torch.softmax(self.model(fashion_cnn.normalize(batch, self.dataset)).float(), dim=1)
        rows = iter(torch.split(probabilities, [len(request.pixels) for request in good]))
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
        # A native request is one image. Ranked in Python: ten floats sort faster than a tensor op is dispatched,
        # and ties keep the lower label first, as argmax does.
        row = probabilities[0].tolist()
        ranked = [{"label": label, "class": self.classes[label], "probability": round(row[label], 6)}
                  for label in sorted(range(len(row)), key=row.__getitem__, reverse=True)[:request.topk]]
        return {"label": ranked[0]["label"], "class": ranked[0]["class"], "topk": ranked, "model": self.model_info}

    def v2_answer(self, prediction: Prediction) -> dict[str, Any]:
        """N rows, one per image; names, datatypes and shapes (-1 is N) from signature.json."""
        request, probabilities = prediction
        labels = probabilities.argmax(dim=1).tolist()
        data = {
            "label": labels,
            "class": [self.classes[label] for label in labels],
            "probabilities": [round(p, 6) for p in probabilities.flatten().tolist()],
        }
        outputs = [
            open_inference.Tensor(output["name"], output["datatype"],
                                  tuple(len(labels) if dimension == -1 else dimension for dimension in output["shape"]),
                                  data[output["name"]])
            for output in self.signature["outputs"]
        ]
        return open_inference.response(self.model_info["name"], self.model_info["version"], request.v2_id or "",
                                       outputs)
