"""Stand-in `orpheus` for perf/loadgen_bench.py: chunks of silence at a set pace, no model.

Each request gets ``max_tokens // 7`` chunks of one frame, the first after one frame's time at ``speed``
times real time, the rest one frame's time apart; one thread paces every stream (as the SNAC decoder's
rounds do), so what limits a level is the load generator, not this model. The config is rendered by
perf/loadgen_bench.py (the ensemble's inputs and output).
"""

import heapq
import itertools
import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

TOKENS_PER_FRAME = 7


class TritonPythonModel:
    def initialize(self, args):
        params = {k: v["string_value"] for k, v in json.loads(args["model_config"])["parameters"].items()}
        self.frame_seconds = int(params["samples_per_chunk"]) / int(params["sample_rate"]) / float(params["speed"])
        self.chunk = np.zeros(int(params["samples_per_chunk"]), dtype=np.int16)
        self.due = []  # (time, order, sender, chunks left)
        self.order = itertools.count()
        self.lock = threading.Condition()
        self.running = True
        self.thread = threading.Thread(target=self.pace, daemon=True)
        self.thread.start()

    def execute(self, requests):
        now = time.monotonic()
        with self.lock:
            for request in requests:
                tokens = pb_utils.get_input_tensor_by_name(request, "max_tokens")
                chunks = int(tokens.as_numpy()[0]) // TOKENS_PER_FRAME if tokens is not None else 35
                heapq.heappush(self.due, (now + self.frame_seconds, next(self.order),
                                          request.get_response_sender(), chunks))
            self.lock.notify()
        return None

    def pace(self):
        while self.running:
            with self.lock:
                while self.running and (not self.due or self.due[0][0] > time.monotonic()):
                    self.lock.wait(timeout=(self.due[0][0] - time.monotonic()) if self.due else 0.5)
                now, ready = time.monotonic(), []
                while self.due and self.due[0][0] <= now:
                    ready.append(heapq.heappop(self.due))
            for due, order, sender, chunks in ready:
                sender.send(pb_utils.InferenceResponse(output_tensors=[pb_utils.Tensor("audio", self.chunk)]))
                if chunks > 1:
                    with self.lock:
                        heapq.heappush(self.due, (due + self.frame_seconds, order, sender, chunks - 1))
                else:
                    sender.send(flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def finalize(self):
        self.running = False
        with self.lock:
            self.lock.notify()
        self.thread.join(timeout=5)
