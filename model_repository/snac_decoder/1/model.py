"""Triton adapter for the batched SNAC decoder (orpheus_triton.serving + orpheus_triton.snac_codec).

Each request is one LLM response (a few token ids) of one stream. All windows
that the batch completes, whatever their stream, go through SNAC in one call.
"""

import numpy as np
import triton_python_backend_utils as pb_utils

from orpheus_triton import constants as c
from orpheus_triton.serving import StreamDecoderState, StreamIdError, model_parameters, require_stream_id, send_error
from orpheus_triton.snac_codec import load_window_decoder, warm_up
from orpheus_triton.triton_llm import pick_device

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL



class TritonPythonModel:
    def initialize(self, args):
        params = model_parameters(args)
        self.decoder = load_window_decoder(params["snac_dir"], device=pick_device(params.get("device", "auto")),
                                           exact=params.get("exact", "false") == "true")
        warm_up(self.decoder)
        self.state = StreamDecoderState()

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
            audio = iter(self.decoder.decode([w for windows in per_request for w in windows]))
        except Exception as error:  # noqa: BLE001 (every stream of the batch must hear why it ends)
            for sender in valid:
                send_error(pb_utils, sender, "decoder", error)
            return None
        for sender, windows in zip(valid, per_request, strict=True):
            if windows:
                pcm = np.concatenate([next(audio) for _ in windows])[None, :]
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor(c.DECODER_AUDIO, pcm)]), flags=FINAL)
            else:
                sender.send(flags=FINAL)
        return None
