"""The upstream Orpheus streaming decoder (orpheus_tts.decoder), transcribed for comparison.

Upstream works on "<custom_token_N>" strings; here the generated token *ids*
are mapped to the same numbers (N = id - 128256) so the arithmetic is
identical: code = N - 10 - (count % 7) * 4096, a window of the last 28 codes is
decoded every 7 accepted codes once 28 are buffered, samples 2048:4096 are
kept and scaled by 32767. Upstream draws SNAC's noise from the global RNG; the
only addition here is ``torch.manual_seed(window seed)`` before each decode,
so that its noise equals the server's seeded noise.
"""

from __future__ import annotations

import numpy as np
import torch

from orpheus_triton.constants import CUSTOM_TOKEN_BASE
from orpheus_triton.frames import window_seed


def turn_token_into_id(token_id: int, index: int) -> int:
    return (token_id - CUSTOM_TOKEN_BASE) - 10 - ((index % 7) * 4096)


def convert_to_audio(snac_model, multiframe: list[int], frame_index: int) -> np.ndarray | None:
    if len(multiframe) < 7:
        return None
    codes_0, codes_1, codes_2 = [], [], []
    num_frames = len(multiframe) // 7
    frame = multiframe[: num_frames * 7]
    for j in range(num_frames):
        i = 7 * j
        codes_0.append(frame[i])
        codes_1 += [frame[i + 1], frame[i + 4]]
        codes_2 += [frame[i + 2], frame[i + 3], frame[i + 5], frame[i + 6]]
    codes = [torch.tensor(c, dtype=torch.int32).unsqueeze(0) for c in (codes_0, codes_1, codes_2)]
    if any(((c < 0) | (c > 4096)).any() for c in codes):
        return None
    torch.manual_seed(window_seed(multiframe, frame_index))
    with torch.inference_mode():
        audio_hat = snac_model.decode(codes)
    audio_slice = audio_hat[:, :, 2048:4096]
    return (audio_slice.detach().cpu().numpy() * 32767).astype(np.int16).reshape(-1)


def reference_decode(snac_model, token_ids, drop_zero_codes: bool = True) -> list[np.ndarray]:
    """Upstream tokens_decoder over a finished token stream; returns the audio chunks it yields.

    ``drop_zero_codes=True`` is upstream verbatim (its ``if token > 0``);
    False treats code 0 as the valid code it is.
    """
    buffer: list[int] = []
    count = 0
    chunks = []
    for token_id in token_ids:
        token = turn_token_into_id(int(token_id), count)
        if token > 0 or (not drop_zero_codes and token == 0):
            buffer.append(token)
            count += 1
            if count % 7 == 0 and count > 27:
                audio = convert_to_audio(snac_model, buffer[-28:], count // 7 - 4)
                if audio is not None:
                    chunks.append(audio)
    return chunks
