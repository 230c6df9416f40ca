"""Triton adapter for the torch in-flight batching engine (orpheus_triton.engine).

execute() only parses requests and hands them over (orpheus_triton.llm_streams):
the engine's loop produces a response per frame of generated tokens, the final
one with the FINAL flag, sent in order (on a thread of their own on GPU).
"""

import triton_python_backend_utils as pb_utils

from orpheus_triton import constants as c
from orpheus_triton.llm_streams import LlmStreams
from orpheus_triton.serving import (
    StreamIdError,
    generation_settings,
    is_stop_request,
    llm_responders,
    model_parameters,
    response_thread,
    stream_idle_seconds,
)
from orpheus_triton.triton_llm import EngineMetrics, build_engine

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
respond, refuse = llm_responders(pb_utils)


class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.engine = build_engine(params)
        self.streams = LlmStreams(
            self.engine, respond, refuse, threaded=response_thread(params, self.engine.device.type),
            tokens_per_response=int(params.get("tokens_per_response", c.TOKENS_PER_FRAME)),
            hold_seconds=stream_idle_seconds(params),
        )
        self.metrics = EngineMetrics(pb_utils, self.engine, self.streams.active)
        self.engine.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            request_id = request.request_id()

            def get(name, request=request):
                tensor = pb_utils.get_input_tensor_by_name(request, name)
                return None if tensor is None else tensor.as_numpy()

            if is_stop_request(get):
                self.streams.stop(request_id)
                sender.send(flags=FINAL)
                continue
            try:
                self.streams.start(request_id, generation_settings(get), sender, request.is_cancelled)
            except (ValueError, StreamIdError) as error:
                refuse(sender, error)
        return None

    def finalize(self):
        self.metrics.stop()
        self.engine.stop()
        self.streams.close()
