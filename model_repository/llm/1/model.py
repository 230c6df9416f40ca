"""Triton adapter for the torch in-flight batching engine (orpheus_triton.engine).

execute() only parses requests and hands them over (orpheus_triton.llm_streams):
the engine's loop produces a response per frame of generated tokens, the final
one with the FINAL flag, sent in order (on a thread of their own on GPU).
"""

import triton_python_backend_utils as pb_utils

from orpheus_triton.callers import CallerLeases, ended_by
from orpheus_triton.constants import LLM_MODEL
from orpheus_triton.llm_streams import LlmStreams
from orpheus_triton.serving import (
    generation_settings,
    llm_responders,
    llm_stream_options,
    log_to_triton,
    model_parameters,
    serve_llm_requests,
)
from orpheus_triton.triton_calls import response_threads
from orpheus_triton.triton_llm import EngineMetrics, build_engine

respond, refuse = llm_responders(pb_utils)


class TritonPythonModel:
    def initialize(self, args):
        log_to_triton(pb_utils)
        params = model_parameters(args)
        # The ensemble's `llm` passes a stop on to the decoder; behind the relay (the engine model), the relay does.
        self.stops_decoding = args["model_name"] == LLM_MODEL
        # Callers in flight are counted by the ensemble's `llm`; behind the relay, by the relay.
        self.callers = CallerLeases.from_environment() if self.stops_decoding else None
        self.engine = build_engine(params)
        self.streams = LlmStreams(
            self.engine, respond, refuse, response_threads=response_threads(params, self.engine.device.type),
            **llm_stream_options(params), caller_gone=ended_by(self.callers),
        )
        if self.callers is not None:
            self.callers.keep_alive(self.streams.active.ids)
        self.metrics = EngineMetrics(pb_utils, self.engine, self.streams.active)
        self.engine.start()

    def execute(self, requests):
        serve_llm_requests(pb_utils, requests, self.start, self.streams.stop, stops_decoding=self.stops_decoding)
        return None

    def start(self, request_id, inputs, sender, is_cancelled):
        self.streams.start(request_id, generation_settings(inputs.get), sender, is_cancelled)

    def finalize(self):
        self.engine.stop()
        self.metrics.stop()  # once the engine has stopped counting: its last counts are published too
        self.streams.close()
        if self.callers is not None:
            self.callers.close()
