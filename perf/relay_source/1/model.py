"""Streams request_output_len audio tokens per request, one per response, without end_id.

Like an engine's loop: one thread, and at every step (``tokens_per_second`` steps
a second, 0: back to back) a token for every active stream.
"""

import threading
import time
from collections import deque

import numpy as np
import triton_python_backend_utils as pb_utils

from orpheus_triton.constants import CODEBOOK_SIZE
from orpheus_triton.frames import audio_token_id
from orpheus_triton.serving import is_stop_request, model_parameters

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


class TritonPythonModel:
    def initialize(self, args):
        rate = float(model_parameters(args)["tokens_per_second"])
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.arrivals: deque = deque()  # (sender, request id, tokens to send)
        self.stopped: set[str] = set()
        self.running = True
        self.loop = threading.Thread(target=self.run, daemon=True)
        self.loop.start()

    def execute(self, requests):
        for request in requests:
            sender = request.get_response_sender()
            inputs = {tensor.name(): tensor.as_numpy() for tensor in request.inputs()}
            if is_stop_request(inputs.get):
                self.stopped.add(request.request_id())
                sender.send(flags=FINAL)
                continue
            self.arrivals.append((sender, request.request_id(), int(inputs["request_output_len"].reshape(-1)[0])))
        return None

    def run(self):
        active: list[list] = []  # [sender, request id, tokens sent, tokens to send]
        due = time.perf_counter()
        while self.running:
            while self.arrivals:
                sender, request_id, count = self.arrivals.popleft()
                active.append([sender, request_id, 0, count])
            if not active:
                time.sleep(0.001)
                due = time.perf_counter()
                continue
            due += self.interval
            time.sleep(max(0.0, due - time.perf_counter()))
            for stream in active:
                sender, request_id, sent, count = stream
                if request_id in self.stopped or sent == count:
                    sender.send(flags=FINAL)
                    stream[2] = -1
                    continue
                token = audio_token_id(sent % CODEBOOK_SIZE, sent)
                sender.send(pb_utils.InferenceResponse([
                    pb_utils.Tensor("output_ids", np.array([[[token]]], dtype=np.int32)),
                    pb_utils.Tensor("sequence_length", np.array([sent + 1], dtype=np.int32)),
                ]))
                stream[2] = sent + 1
            active = [s for s in active if s[2] >= 0]

    def finalize(self):
        self.running = False
        self.loop.join(timeout=5)
