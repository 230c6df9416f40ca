"""Triton adapter for the relay in front of a token-by-token engine model (orpheus_triton.llm_relay).

execute() only parses requests and hands them over; the engine model is called
through BLS, its responses read on a thread per stream.
"""

import triton_python_backend_utils as pb_utils

from orpheus_triton import constants as c
from orpheus_triton.callers import CallerLeases, ended_by
from orpheus_triton.llm_relay import ENGINE_OUTPUTS, EngineInputs, EngineResponse, HeldReferences, RelayStreams
from orpheus_triton.metrics import RelayMetrics
from orpheus_triton.serving import (
    llm_responders,
    llm_stream_options,
    log_to_triton,
    model_parameters,
    serve_llm_requests,
    stop_request_inputs,
)

respond, refuse = llm_responders(pb_utils)


class TritonPythonModel:
    def initialize(self, args):
        log_to_triton(pb_utils)
        params = model_parameters(args)
        self.engine_model = params["engine_model"]
        self.held = HeldReferences()
        self.callers = CallerLeases.from_environment()
        self.streams = RelayStreams(
            self.call, self.stop_engine, respond, refuse,
            engine_inputs=EngineInputs(seed=params.get("engine_seed_input", c.LLM_SEED),
                                       audio_guard=params.get("engine_audio_guard", "true") == "true"),
            **llm_stream_options(params), caller_gone=ended_by(self.callers),
        )
        if self.callers is not None:
            self.callers.keep_alive(self.streams.active.ids)
        self.metrics = RelayMetrics(pb_utils, c.LLM_MODEL, args["model_instance_name"], self.streams.in_flight)

    def call(self, request_id, inputs):
        request = pb_utils.InferenceRequest(
            model_name=self.engine_model, requested_output_names=list(ENGINE_OUTPUTS),
            inputs=[pb_utils.Tensor(name, value) for name, value in inputs.items()], request_id=request_id,
            preferred_memory=pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0),
        )
        held = [request]  # freed by Python, after the backend's own cleanup (llm_relay.HeldReferences)
        try:
            for response in request.exec(decoupled=True):
                held.append(response)
                if response.has_error():
                    yield EngineResponse([], response.error().message())
                    return
                ids = pb_utils.get_output_tensor_by_name(response, c.LLM_OUTPUT_IDS)
                yield EngineResponse([] if ids is None else ids.as_numpy().reshape(-1).tolist())
        finally:
            self.held.keep(held)

    def stop_engine(self, request_id):
        for _ in self.call(request_id, stop_request_inputs()):
            pass

    def execute(self, requests):
        serve_llm_requests(pb_utils, requests, self.streams.start, self.streams.stop)
        return None

    def finalize(self):
        self.streams.close()
        if self.callers is not None:
            self.callers.close()
        self.metrics.stop()
        self.held.clear()
