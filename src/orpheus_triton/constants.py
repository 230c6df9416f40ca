"""Every fact the server, the client, the tests and the config renderer share.

Orpheus 3B is Llama-3.2-3B with 28,684 extra tokens appended to the Llama-3
vocabulary: a handful of control tokens and seven banks of 4096 SNAC codes.
The ids below are those of the published checkpoints; nothing else in the
project spells them out.
"""

from __future__ import annotations

# --- Orpheus vocabulary layout --------------------------------------------------
VOCAB_SIZE = 156_940
BEGIN_OF_TEXT = 128_000  # Llama-3 BOS
END_OF_TEXT = 128_009  # Llama-3 <|eot_id|>, closes the text turn
START_OF_SPEECH = 128_257
END_OF_SPEECH = 128_258  # generation stops here
NO_END_ID = -1  # as a request's end_id: no token ends the stream, only max_tokens (benchmarks)
START_OF_HUMAN = 128_259
END_OF_HUMAN = 128_260
START_OF_AI = 128_261
END_OF_AI = 128_262
PAD_TOKEN = 128_263
CUSTOM_TOKEN_BASE = 128_256  # "<custom_token_N>" has id CUSTOM_TOKEN_BASE + N
AUDIO_TOKEN_BASE = 128_266  # id of code 0 in frame slot 0

# --- SNAC frame layout -------------------------------------------------------------
CODEBOOK_SIZE = 4096
TOKENS_PER_FRAME = 7
# The fewest ids a checkpoint's vocabulary may have: every audio token (slot 6's last code is 156,937).
# Orpheus's fine-tunes have VOCAB_SIZE; its pretrained checkpoint one fewer.
MIN_VOCAB_SIZE = AUDIO_TOKEN_BASE + TOKENS_PER_FRAME * CODEBOOK_SIZE
# Which SNAC codebook each of the 7 slots of a frame belongs to. Codebook 0 runs
# at 12 Hz (1 code per frame), codebook 1 at 23 Hz (2), codebook 2 at 47 Hz (4).
SLOT_CODEBOOK = (0, 1, 2, 2, 1, 2, 2)
CODES_PER_FRAME = (1, 2, 4)
SAMPLE_RATE = 24_000
SAMPLES_PER_FRAME = 2048  # one frame of codes is 2048 samples (~85 ms) of audio
FRAMES_PER_WINDOW = 4  # the streaming decoder decodes 4 frames at a time ...
WINDOW_TOKENS = FRAMES_PER_WINDOW * TOKENS_PER_FRAME  # ... i.e. 28 tokens
WINDOW_KEEP_START = 2048  # ... and keeps the second frame's samples,
WINDOW_KEEP_END = 4096  # where context on both sides hides window seams.
# The lead-in frame (frames.StreamFramer): frame 0's audio, which that decoder never emits, from a window
# whose first frame repeats frame 0, once 3 frames are in. First audio then needs 21 tokens, not 28.
LEAD_IN_TOKENS = (FRAMES_PER_WINDOW - 1) * TOKENS_PER_FRAME
# Windows per SNAC decoder call at most: a round takes one window per stream, so 216 streams fit one.
MAX_ROUND_WINDOWS = 256
REAL_TIME_TOKENS_PER_SECOND = TOKENS_PER_FRAME * SAMPLE_RATE / SAMPLES_PER_FRAME  # ~82
# A chunk that comes this close after its listener's audio ran out is on time (float rounding); later, the
# listener heard a gap. One rule for the load generator's client-side count and the server's estimate.
STALL_TOLERANCE = 1e-6  # seconds
# While a newcomer waits for its first audio, the decoder's next round leaves out the streams with more
# than this much audio still to play (decode_rounds.DecodeScheduler): first audio from a small round. On 2 CPU
# cores no difference beyond the VM's spread (perf/results/2026-11-26_cpu-2core-newcomer-round); meant
# for rounds many times a lone window's time (a GPU at hundreds of streams).
NEWCOMER_ROUND_HORIZON = 0.25  # seconds
# How often the llm adapters ask Triton about every running request's cancellation, where a thread of their
# own does it (GPU; triton_calls.CancellationWatch): passes start at least CANCEL_CHECK_SECONDS apart (0: at
# every engine step), and rest between them at least (1 - duty) / duty times as long as the last one took, so
# that they take at most CANCEL_CHECK_DUTY of that thread's time whatever the streams. Each question is a round
# trip to the server (34-53 us on 2 CPU cores: a pass over 216 streams 7.2-7.6 ms, perf/round_trips.py), and
# the server answers them beside the responses. A cancellation lands within the interval and a step. Every
# step within the duty (CANCEL_CHECK_SECONDS 0) against every 0.1 s, served at 128 streams on 2 CPU cores:
# no clear difference in two pairs of runs (perf/results/2026-11-26_cpu-2core-amd-epyc-plumbing). On an
# H100's host (perf/results/2026-11-27_h100, round trips): an ask 41 us, a pass over 216 streams 8.8 ms, over
# 32 1.3 ms; sends slowed by 13-18% while another thread ran passes back to back, so by 1-2% at the duty's
# tenth. At 0, then, a pass every engine step (6-10 ms) up to a few dozen streams, a cancellation landing
# within a step or two, and at 216 streams one about every 90 ms, as often as every 0.1 s would allow.
CANCEL_CHECK_SECONDS = 0.0
CANCEL_CHECK_DUTY = 0.1
# Threads the SNAC decoder's responses leave from on a GPU by default (the response_thread parameter's auto;
# the llm model's: 1). Served on an H100 at 216 streams with the LLM a stand-in that costs nothing, its one
# response thread sent without pause (95% of its samples in the send) while the decoding thread waited for
# it (37%): 332 of 432 streams starved, first audio 354 ms p50. With both models' responses on two threads
# each: 201 starved, 277 ms, the decoder's two threads about 68% busy each, the llm's about 30% (it was about
# 50% on its own one) (perf/results/2026-11-27_h100).
DECODER_GPU_RESPONSE_THREADS = 2
# Most threads a model's responses may leave from (the response_thread parameter, serve --response-threads):
# more would only contend for the GIL and the backend stub's message queue.
MAX_RESPONSE_THREADS = 16

# --- Voices and sampling defaults ---------------------------------------------------
VOICES = ("tara", "leah", "jess", "leo", "dan", "mia", "zac", "zoe")
DEFAULT_VOICE = "tara"
EMOTIVE_TAGS = ("<laugh>", "<chuckle>", "<sigh>", "<cough>", "<sniffle>", "<groan>", "<yawn>", "<gasp>")
DEFAULT_TEMPERATURE = 0.6
DEFAULT_TOP_P = 0.8
DEFAULT_TOP_K = 0  # 0 = no top-k cut
DEFAULT_REPETITION_PENALTY = 1.1
DEFAULT_MAX_TOKENS = 1200  # ~14 s of audio
MAX_TEXT_CHARS = 2000
# The range a request's max_tokens may take: fewer than one frame's tokens can give no audio at all.
MIN_MAX_TOKENS = TOKENS_PER_FRAME
MAX_MAX_TOKENS = 8192


# A client's string (a voice, a request id) in an error message: at most this many characters of it.
SHOWN_CHARS = 64


def shown(value: str) -> str:
    """``value`` as an error message quotes it: whole, or its start and its length (a 10 MB voice name
    came back whole in its refusal)."""
    if len(value) <= SHOWN_CHARS:
        return repr(value)
    return f"{value[:SHOWN_CHARS]!r}... ({len(value)} characters)"


def max_tokens_refusal(max_tokens: int) -> str | None:
    """Why a request's ``max_tokens`` is refused, or None: the server's check (preprocessing), which the
    clients and the command lines repeat before anything is sent."""
    if MIN_MAX_TOKENS <= max_tokens <= MAX_MAX_TOKENS:
        return None
    return (f"max_tokens must be in [{MIN_MAX_TOKENS}, {MAX_MAX_TOKENS}] ({MIN_MAX_TOKENS} tokens: one SNAC frame, "
            f"the least that gives audio), got {max_tokens}")


# --- Triton endpoints (tritonserver's own defaults) -------------------------------------
DEFAULT_GRPC_PORT = 8001
DEFAULT_HTTP_PORT = 8000
DEFAULT_METRICS_PORT = 8002
DEFAULT_GRPC_URL = f"localhost:{DEFAULT_GRPC_PORT}"
# The words that open a refusal to retry, later or on another server (the bundled clients raise
# ServerUnavailable for them): every slot taken and the queue full, or the server draining to stop.
SERVER_BUSY = "server busy"
SERVER_SHUTTING_DOWN = "server shutting down"
# The server's environment names the file whose presence means: stopping, take no new streams
# (server.Drain raises it, preprocessing reads it).
DRAIN_FILE_ENV = "ORPHEUS_DRAIN_FILE"
# ... and the folder where its stages keep a lease per caller in flight (callers.CallerLeases; the launcher
# makes one per run).
CALLERS_DIR_ENV = "ORPHEUS_CALLERS_DIR"

# --- Triton model names ---------------------------------------------------------------
ENSEMBLE_MODEL = "orpheus"
PREPROCESSING_MODEL = "preprocessing"
LLM_MODEL = "llm"
DECODER_MODEL = "snac_decoder"
# The engine model behind the `llm` relay where the LLM stage streams token by token (TensorRT-LLM's
# Triton backend); the name tensorrtllm_backend's own repositories give it.
ENGINE_MODEL = "tensorrt_llm"

# --- Public tensor contract of the `orpheus` ensemble ----------------------------------
IN_TEXT = "text"
IN_VOICE = "voice"
IN_MAX_TOKENS = "max_tokens"
IN_TEMPERATURE = "temperature"
IN_TOP_P = "top_p"
IN_REPETITION_PENALTY = "repetition_penalty"
IN_SEED = "seed"
OUT_AUDIO = "audio"
# Why a stream's audio ended (BYTES [1], UTF-8), on the response that carries its last audio (or on its
# empty final response): the llm stage says it with its last tokens, the decoder hands it on.
OUT_FINISH_REASON = "finish_reason"
FINISH_END_OF_SPEECH = "end_of_speech"  # the model ended its speech (its end-of-speech token)
FINISH_MAX_TOKENS = "max_tokens"  # cut at the request's max_tokens: the text's last words may be missing
FINISH_STOPPED = "stopped"  # a `stop` for its id ended it

# --- The LLM stage: the TensorRT-LLM backend's tensor names -----------------------------
LLM_INPUT_IDS = "input_ids"
LLM_INPUT_LENGTHS = "input_lengths"
LLM_REQUEST_OUTPUT_LEN = "request_output_len"
LLM_END_ID = "end_id"
LLM_PAD_ID = "pad_id"
LLM_STREAMING = "streaming"
LLM_TEMPERATURE = "temperature"
LLM_TOP_P = "runtime_top_p"
LLM_TOP_K = "runtime_top_k"
LLM_REPETITION_PENALTY = "repetition_penalty"
LLM_SEED = "random_seed"
LLM_STOP = "stop"  # TensorRT-LLM's "stop this request id" input
LLM_OUTPUT_IDS = "output_ids"
LLM_SEQUENCE_LENGTH = "sequence_length"
# Not part of TensorRT-LLM's contract: why the stream ended (FINISH_*), on its final response only.
LLM_FINISH_REASON = OUT_FINISH_REASON
# Not part of TensorRT-LLM's contract: the torch engine's per-request switch for
# the audio-token guard (on when absent).
LLM_AUDIO_GUARD = "audio_token_guard"

# --- snac_decoder -----------------------------------------------------------------------
DECODER_TOKENS = "output_ids"
DECODER_AUDIO = "audio"
# Why the stream ended (the llm stage's LLM_FINISH_REASON), on its last request; handed on with the
# stream's last response.
DECODER_FINISH_REASON = OUT_FINISH_REASON
# Decode nothing more of the stream with this request's id (BOOL; the llm stage passes its `stop` on):
# what of it is queued, or still to come up to its end, is answered without audio.
DECODER_STOP = "stop"
# When preprocessing took the request (seconds since the epoch, FP64): the ensemble hands it to the decoder
# beside the tokens, which measures the server's time to first audio from it (optional for the decoder).
REQUEST_START = "request_start"

# How long the decoder keeps a mid-stream state without tokens (a client that vanished), and so how
# long the llm stage refuses the id of a stream that ended without end_id: the two must be the same.
STREAM_STATE_SECONDS = 600.0
