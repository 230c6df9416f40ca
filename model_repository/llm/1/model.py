"""Triton adapter for the torch in-flight batching engine (orpheus_triton.engine).

execute() only parses requests and hands them to the engine; the engine's loop
thread sends one response per generated token through each request's
response sender, and the final one with the FINAL flag.
"""

import contextlib

import numpy as np
import triton_python_backend_utils as pb_utils

from orpheus_triton import constants as c
from orpheus_triton.engine import CapacityError, GenerationRequest
from orpheus_triton.serving import (
    ActiveStreams,
    FrameChunker,
    StreamIdError,
    generation_settings,
    is_stop_request,
    model_parameters,
    send_error,
)
from orpheus_triton.triton_llm import EngineMetrics, build_engine

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL



class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.engine = build_engine(params)
        self.tokens_per_response = int(params.get("tokens_per_response", c.TOKENS_PER_FRAME))
        self.active = ActiveStreams()
        self.metrics = EngineMetrics(pb_utils, self.engine, self.active)
        self.engine.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            request_id = request.request_id()
            def get(name, request=request):
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                return None if tensor is None else tensor.as_numpy()

            if is_stop_request(get):
                self.engine.stop_stream(request_id)
                sender.send(flags=FINAL)
                continue
            try:
                settings = generation_settings(get)
                self.active.claim(request_id)
            except (ValueError, StreamIdError) as error:
                send_error(pb_utils, sender, "llm", error)
                continue
            try:
                self.engine.submit(
                    GenerationRequest(
                        **settings, emit=self._emitter(sender, request_id), fail=self._failer(sender, request_id),
                        is_cancelled=request.is_cancelled, request_id=request_id,
                    )
                )
            except (CapacityError, ValueError) as error:
                self.active.release(request_id)
                send_error(pb_utils, sender, "llm", error)
        return None

    def _emitter(self, sender, request_id):
        chunks = FrameChunker(self.tokens_per_response)

        def emit(tokens, finished):
            ready = chunks.add(tokens, finished)
            if ready is None:
                return
            response = pb_utils.InferenceResponse([
                pb_utils.Tensor(c.LLM_OUTPUT_IDS, np.array([[ready]], dtype=np.int32)),
                pb_utils.Tensor(c.LLM_SEQUENCE_LENGTH, np.array([chunks.sent], dtype=np.int32)),
            ])
            if finished:
                self.active.release(request_id)
            sender.send(response, flags=FINAL if finished else 0)

        return emit

    def _failer(self, sender, request_id):
        def fail(message):
            self.active.release(request_id, completed=False)
            # A cancelled request's sender is already closed by Triton: nothing more to say.
            with contextlib.suppress(Exception):
                send_error(pb_utils, sender, "llm", message)

        return fail

    def finalize(self):
        self.metrics.stop()
        self.engine.stop()
