"""A stand-in for the SNAC decoder without a model: the serving pipeline with a decoder that costs nothing.

perf/run_all.py --silent-snac appends this file to the rendered repository's
snac_decoder/1/model.py (perf/common.use_silent_snac), whose ``load_window_decoder`` and
``warm_up`` it then replaces: the real adapter (decode_rounds.DecodeScheduler's rounds, the response
thread, DecoderMetrics) in front of ``SilentDecoder``, which answers every window with a frame
of silence. With perf/paced_llm's engine beside it, a served sweep measures only what carries
the audio: preprocessing, the ensemble, both adapters' threads and round trips, Triton and the
load generator.
(No ``from __future__`` import: this text follows another module's.)
"""

import numpy as np

from orpheus_triton.constants import SAMPLES_PER_FRAME


class SilentDecoder:
    """WindowDecoder's ``decode`` without SNAC: a frame of silence (int16 zeros) for every window."""

    mode = "silent"

    def decode(self, windows: list) -> list[np.ndarray]:
        return [np.zeros(SAMPLES_PER_FRAME, dtype=np.int16) for _ in windows]


def load_silent_decoder(path, device="cpu", exact: bool = False, max_windows: int | None = None) -> SilentDecoder:
    """``snac_codec.load_window_decoder``'s stand-in: reads no weights."""
    return SilentDecoder()


def warm_up_silent(decoder: SilentDecoder) -> None:
    """``snac_codec.warm_up``'s stand-in: nothing to warm."""
