"""Times the Python backend's round trips from inside the stub (perf/round_trips.py).

Held requests are the streams. A measuring request starts a thread that, for
``seconds`` per pattern, sends responses and asks ``is_cancelled`` on the held
streams round robin, in the patterns the llm and snac_decoder adapters use
(triton_calls.ResponseQueue, triton_calls.CancellationWatch), and sends from several threads
at once (a send releases the GIL while the server takes it), and a request's own lookups (an input
there and one not, the outputs it asks for: local to the stub, no round trip; the snac_decoder adapter
makes several a request), then answers with the timings and ends every held stream. No request is asked
anything after its final response.
"""

import json
import threading
import time

import numpy as np
import triton_python_backend_utils as pb_utils

from orpheus_triton.constants import SAMPLES_PER_FRAME, TOKENS_PER_FRAME

FINAL = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL


def _timed(call, seconds: float) -> dict:
    """Call ``call(i)`` for i = 0, 1, ... for ``seconds``: calls a second and the per-call times."""
    times = []
    started = time.perf_counter()
    while (now := time.perf_counter()) - started < seconds:
        call(len(times))
        times.append(time.perf_counter() - now)
    us = np.array(times) * 1e6
    return {"calls": len(times), "per_second": round(len(times) / (time.perf_counter() - started)),
            "p50_us": round(float(np.median(us)), 1), "p99_us": round(float(np.percentile(us, 99)), 1)}


class TritonPythonModel:
    def initialize(self, args):
        self.held = []  # (request, sender) of the held streams

    def execute(self, requests):
        for request in requests:
            seconds = float(pb_utils.get_input_tensor_by_name(request, "seconds").as_numpy().reshape(-1)[0])
            sender = request.get_response_sender()
            if seconds <= 0:
                self.held.append((request, sender))
            else:
                held, self.held = self.held, []
                threading.Thread(target=self.measure, args=(sender, held, seconds), daemon=True).start()
        return None

    def measure(self, sender, held, seconds):
        try:
            result = self.patterns(held, seconds) if held else {"error": "no held streams to measure on"}
        except Exception as error:  # noqa: BLE001 (the client hears it)
            result = {"error": repr(error)}
        finally:
            for _, stream in held:
                stream.send(flags=FINAL)
        sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("result", np.array([json.dumps(result)],
                                                                                      dtype=object))]), flags=FINAL)

    @staticmethod
    def patterns(streams, seconds) -> dict:
        requests, held = [request for request, _ in streams], [sender for _, sender in streams]
        tokens = pb_utils.Tensor("tokens", np.arange(TOKENS_PER_FRAME, dtype=np.int32))  # an llm response
        audio = pb_utils.Tensor("audio", np.zeros(SAMPLES_PER_FRAME, dtype=np.int16))  # a decoder response
        n = len(held)

        def send_tokens(i):
            held[i % n].send(pb_utils.InferenceResponse([tokens]))

        def send_audio(i):
            held[i % n].send(pb_utils.InferenceResponse([audio]))

        def ask(i):
            held[i % n].is_cancelled()

        def input_there(i):
            pb_utils.get_input_tensor_by_name(requests[i % n], "seconds")

        def input_absent(i):  # an optional input the request did not send (the decoder's stop, start, finish)
            pb_utils.get_input_tensor_by_name(requests[i % n], "absent")

        def outputs_asked(i):
            requests[i % n].requested_output_names()

        def cancellation_pass(_):
            for stream in held:
                stream.is_cancelled()

        def beside(main, other) -> tuple[dict, dict]:
            """``main`` timed while ``other`` runs back to back on a second thread."""
            stop, counted = threading.Event(), []

            def run_other():
                calls, started = 0, time.perf_counter()
                while not stop.is_set():
                    other(calls)
                    calls += 1
                counted.append(round(calls / (time.perf_counter() - started)))

            thread = threading.Thread(target=run_other)
            thread.start()
            try:
                timed = _timed(main, seconds)
            finally:
                stop.set()
                thread.join()
            return timed, {"per_second": counted[0]}

        def from_threads(threads: int) -> dict:
            """Sends of audio from ``threads`` threads at once, each on its own share of the streams (a stream's
            responses from one thread, in order, as the adapters keep them): their sends a second together."""
            shares = [share for share in (held[j::threads] for j in range(threads)) if share]
            results = [None] * len(shares)

            def run(j):
                share = shares[j]
                results[j] = _timed(lambda i: share[i % len(share)].send(pb_utils.InferenceResponse([audio])), seconds)

            workers = [threading.Thread(target=run, args=(j,)) for j in range(len(shares))]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join()
            return {"threads": len(shares), "calls": sum(r["calls"] for r in results),
                    "per_second": sum(r["per_second"] for r in results),
                    "p50_us": round(float(np.median([r["p50_us"] for r in results])), 1),
                    "p99_us": max(r["p99_us"] for r in results)}

        sends_beside_asks, asks_beside = beside(send_tokens, ask)
        sends_beside_passes, passes_beside = beside(send_tokens, cancellation_pass)
        return {
            "streams": n,
            "send_tokens": _timed(send_tokens, seconds),
            "send_audio": _timed(send_audio, seconds),
            "is_cancelled": _timed(ask, seconds),
            "cancellation_pass": _timed(cancellation_pass, seconds),
            "send_then_ask_one_thread": _timed(lambda i: (send_tokens(i), ask(i)), seconds),
            "send_beside_asking_thread": sends_beside_asks,
            "asking_thread_beside_sends": asks_beside,
            "send_beside_pass_thread": sends_beside_passes,
            "pass_thread_beside_sends": passes_beside,
            "send_audio_2_threads": from_threads(2),
            "send_audio_4_threads": from_threads(4),
            "input_there": _timed(input_there, seconds),
            "input_absent": _timed(input_absent, seconds),
            "outputs_asked": _timed(outputs_asked, seconds),
        }
