"""Triton adapter for the batched SNAC decoder (orpheus_triton.serving + orpheus_triton.snac_codec).

Each request is one LLM response (a few token ids) of one stream. The windows the
batch completes go through SNAC in rounds (serving.decode_rounds): each round
takes the next request of every stream in the batch, in one call.
"""

import time

import numpy as np
import triton_python_backend_utils as pb_utils

from orpheus_triton import constants as c
from orpheus_triton.metrics import DecoderMetrics
from orpheus_triton.serving import (
    StreamDecoderState,
    StreamIdError,
    decode_rounds,
    model_parameters,
    require_stream_id,
    send_error,
)
from orpheus_triton.snac_codec import load_window_decoder, warm_up
from orpheus_triton.triton_llm import pick_device, set_cpu_threads

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL



class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        device = pick_device(params.get("device", "auto"))
        set_cpu_threads(params, device)
        self.decoder = load_window_decoder(params["snac_dir"], device=device, exact=params.get("exact") == "true")
        warm_up(self.decoder)
        self.state = StreamDecoderState()
        self.metrics = DecoderMetrics(pb_utils)

    def execute(self, requests):
        valid, chunks = [], []
        for request in requests:
            sender = request.get_response_sender()
            try:
                stream_id = require_stream_id(request.request_id())
            except StreamIdError as error:
                send_error(pb_utils, sender, "decoder", error)
                continue
            tokens = pb_utils.get_input_tensor_by_name(request, c.DECODER_TOKENS).as_numpy()
            valid.append(sender)
            chunks.append((stream_id, tokens))
        try:
            per_request = self.state.windows_for(chunks)
        except Exception as error:  # noqa: BLE001 (every stream of the batch must hear why it ends)
            for sender in valid:
                send_error(pb_utils, sender, "decoder", error)
            return None
        rounds = decode_rounds([stream_id for stream_id, _ in chunks])
        for number, members in enumerate(rounds):
            windows = [w for i in members for w in per_request[i]]
            started = time.perf_counter()
            try:
                audio = iter(self.decoder.decode(windows))
            except Exception as error:  # noqa: BLE001
                for i in [i for later in rounds[number:] for i in later]:
                    send_error(pb_utils, valid[i], "decoder", error)
                return None
            self.metrics.record_call(len(windows), time.perf_counter() - started)
            for i in members:
                if per_request[i]:
                    pcm = np.concatenate([next(audio) for _ in per_request[i]])[None, :]
                    valid[i].send(pb_utils.InferenceResponse([pb_utils.Tensor(c.DECODER_AUDIO, pcm)]), flags=FINAL)
                else:
                    valid[i].send(flags=FINAL)
        self.metrics.record_streams(len(self.state.streams))
        return None
