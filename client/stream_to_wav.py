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
import queue
import time
import uuid
import wave

import numpy as np
import tritonclient.grpc as grpcclient

SAMPLE_RATE = 24_000  # the ensemble's output rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("text")
    parser.add_argument("output")
    parser.add_argument("--url", default="localhost:8001")
    parser.add_argument("--voice", help="one of the server's voices (default: the server's default voice)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-tokens", type=int,
                        help="audio tokens at most, 7 per 85 ms (default: the server's, 1200 or what fits)")
    args = parser.parse_args()

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
    try:
        client.start_stream(callback=lambda result, error: responses.put((result, error)))
        client.async_stream_infer("orpheus", inputs, request_id=str(uuid.uuid4()),
                                  enable_empty_final_response=True)
    except grpcclient.InferenceServerException as error:  # e.g. nothing listening at --url
        raise SystemExit(f"could not reach the server at {args.url}: {error}") from None

    wav, samples = None, 0  # the file is created with the first audio: a failed request leaves none
    try:
        while True:
            result, error = responses.get(timeout=600)
            if error is not None:
                raise SystemExit(f"server error: {error}")
            audio = result.as_numpy("audio")
            if audio is not None and audio.size:
                if wav is None:
                    print(f"first audio after {1000 * (time.perf_counter() - started):.0f} ms")
                    wav = wave.open(args.output, "wb")  # noqa: SIM115 (closed below)
                    wav.setnchannels(1)
                    wav.setsampwidth(2)
                    wav.setframerate(SAMPLE_RATE)
                wav.writeframes(audio.astype("<i2").tobytes())
                samples += audio.size
            if result.get_response().parameters["triton_final_response"].bool_param:
                break
    finally:
        if wav is not None:
            wav.close()
    client.stop_stream()
    print(f"wrote {args.output}: {samples / SAMPLE_RATE:.2f} s of audio in {time.perf_counter() - started:.2f} s")


if __name__ == "__main__":
    main()
