#!/usr/bin/env python3
"""Minimal streaming client for the `orpheus` ensemble, using only tritonclient and numpy.

    pip install "tritonclient[grpc]" numpy
    python client/stream_to_wav.py "Hello there <laugh>" out.wav --url localhost:8001 --voice tara

It shows the whole protocol in one page: one gRPC stream, a unique request id
per utterance (the server keys each stream's decoder state by it), and int16
24 kHz PCM chunks appended to a WAV file as they arrive. The full client with
timing figures is `orpheus-triton say` (orpheus_triton/client.py).
"""

import argparse
import contextlib
import queue
import signal
import sys
import time
import uuid
import wave

import numpy as np
import tritonclient.grpc as grpcclient

SAMPLE_RATE = 24_000  # the ensemble's output rate


def send_stop(client: grpcclient.InferenceServerClient, request_id: str) -> None:
    """The `llm` model's `stop` request for the stream's id (TensorRT-LLM's), sent on the stream's own gRPC
    stream (a new connection, set up as the caller hangs up, can take a second on a busy machine): its
    generation ends within a step and the stream ends normally. The required inputs ride along, ignored.
    Its answer, an empty final response from the `llm` model (or an error), comes among the stream's."""
    inputs = []
    for name, value, kind in (("input_ids", np.zeros((1, 1), np.int32), "INT32"),
                              ("input_lengths", np.ones((1, 1), np.int32), "INT32"),
                              ("request_output_len", np.ones((1, 1), np.int32), "INT32"),
                              ("stop", np.ones((1, 1), np.bool_), "BOOL")):
        tensor = grpcclient.InferInput(name, list(value.shape), kind)
        tensor.set_data_from_numpy(value)
        inputs.append(tensor)
    client.async_stream_infer("llm", inputs, request_id=request_id, enable_empty_final_response=True)


def end_early(client: grpcclient.InferenceServerClient, request_id: str, responses: queue.Queue, heard: bool,
              timeout: float = 15.0) -> bool:
    """Stop the stream's generation and read the stream on to its final response. A stop sent before the
    request reached the llm model finds nothing to stop: until the stream has answered (``heard``), the
    stop goes again every 0.25 s. Each stop, like the stream, ends in one final response or one error,
    and an error does not say whose: the stream has ended once more of them came than stops were sent.
    False if the end did not come within ``timeout``."""
    now = time.monotonic()
    deadline, next_stop, sent = now + timeout, now, now
    stops = ends = 0
    while now < deadline:
        if next_stop is not None and now >= next_stop:
            try:
                send_stop(client, request_id)
            except grpcclient.InferenceServerException:
                return False  # the gRPC stream is broken: nothing more comes on it
            stops, sent = stops + 1, now
            next_stop = None if heard else now + 0.25
        with contextlib.suppress(queue.Empty):
            result, error = responses.get(timeout=max(0.0, min(deadline, next_stop or deadline) - now))
            if error is not None or result.get_response().model_name == "llm":
                ends += 1
                if ends > stops:
                    return True  # the stream's own error came beside every stop's answer
                if error is not None:  # it may have been a stop's: another one, a quarter second after the last
                    next_stop = sent + 0.25
            elif result.get_response().parameters["triton_final_response"].bool_param:
                return True
            else:
                heard = True
        now = time.monotonic()
    return False


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text")
    parser.add_argument("output")
    parser.add_argument("--url", default="localhost:8001")
    parser.add_argument("--voice", help="one of the server's voices (default: the server's default voice)")
    parser.add_argument("--seed", type=int, default=0, help="0 to 2**64 - 1")
    parser.add_argument("--max-tokens", type=int,
                        help="audio tokens at most, 7 per 85 ms (default: the server's, 1200 or what fits)")
    args = parser.parse_args()
    if not 0 <= args.seed < 2**64:  # numpy would wrap -1 into another seed without a word
        parser.error(f"--seed {args.seed}: a seed is from 0 to 2**64 - 1")

    inputs = []
    for name, value, dtype, kind in (("text", args.text.encode(), np.object_, "BYTES"),
                                     ("voice", args.voice and args.voice.encode(), np.object_, "BYTES"),
                                     ("seed", args.seed, np.uint64, "UINT64"),
                                     ("max_tokens", args.max_tokens, np.int32, "INT32")):
        if value is None:  # an option left out: the server's default
            continue
        tensor = grpcclient.InferInput(name, [1], kind)
        tensor.set_data_from_numpy(np.array([value], dtype=dtype))
        inputs.append(tensor)

    responses: queue.Queue = queue.Queue()
    client = grpcclient.InferenceServerClient(args.url)
    started = time.perf_counter()
    request_id = str(uuid.uuid4())
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer("orpheus", inputs, request_id=request_id, enable_empty_final_response=True)
    except grpcclient.InferenceServerException as error:  # e.g. nothing listening at --url
        reason = error
        with contextlib.suppress(queue.Empty):
            reason = responses.get(timeout=1)[1] or error  # the stream's callback has the reason
        client.stop_stream()
        raise SystemExit(f"could not reach the server at {args.url}: {reason}") from None

    wav, samples, finished = None, 0, False  # the file is created with the first audio: a failed request leaves none
    heard, finish_reason = False, None
    try:
        while True:
            result, error = responses.get(timeout=600)
            if error is not None:  # the stream has ended: the server's error, or its connection's
                finished = True
                where = "the server" if error.status() != "StatusCode.UNAVAILABLE" else f"the connection to {args.url}"
                raise SystemExit(f"{where} failed: {error}")
            heard = True
            # Ended with its final response, whatever happens while its audio is written (a Ctrl-C then).
            finished = result.get_response().parameters["triton_final_response"].bool_param
            reason = result.as_numpy("finish_reason")  # with the stream's last audio: why it ended
            if reason is not None:
                finish_reason = reason.reshape(-1)[0].decode()
            audio = result.as_numpy("audio")
            if audio is not None and audio.size:
                if wav is None:
                    first_audio = time.perf_counter() - started
                    wav = wave.open(args.output, "wb")  # noqa: SIM115 (closed below)
                    wav.setnchannels(1)
                    wav.setsampwidth(2)
                    wav.setframerate(SAMPLE_RATE)
                    print(f"first audio after {1000 * first_audio:.0f} ms", flush=True)
                wav.writeframes(audio.astype("<i2").tobytes())
                samples += audio.size
            if finished:
                break
    finally:
        try:
            if wav is not None:
                wav.close()  # fails if a Ctrl-C came before its header was set: the stream still ends below
        finally:
            # Ctrl-C or an error: end the generation, then read the stream to its end (cancelling the gRPC
            # stream alone leaves the generation running and the request counted in flight on the server).
            try:
                finished = finished or end_early(client, request_id, responses, heard)
            finally:  # a second Ctrl-C cuts the wait short: the stream is cancelled, not waited for
                client.stop_stream(cancel_requests=not finished)
    print(f"wrote {args.output}: {samples / SAMPLE_RATE:.2f} s of audio in {time.perf_counter() - started:.2f} s")
    if finish_reason == "max_tokens":  # end_of_speech: the model ended its speech; stopped: a stop ended it
        print("the audio was cut at the request's max_tokens (--max-tokens, or the server's default): the text's "
              "last words may be missing")


def interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


if __name__ == "__main__":
    # kill, timeout or a closed terminal end the stream as Ctrl-C does (a stop, then its end read); else the
    # process died with generation running on to max_tokens and the request counted in flight on the server.
    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGHUP, interrupt)
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        raise SystemExit(130) from None
