"""Write perf/data/: perf_analyzer --input-data files for the `orpheus` ensemble and for `snac_decoder`.

    python perf/make_input_data.py            # rewrites perf/data/*.json

orpheus_{short,medium,long}.json: the load generator's benchmark texts
(orpheus_triton.loadgen.TEXTS), one entry per voice, with text, voice,
max_tokens and seed. orpheus_mixed.json interleaves all three lengths.

snac_decoder.json: each entry is one whole stream for the decoder alone: one
frame (7 valid audio token ids, random codes, in frame-slot order) followed by
end-of-speech, shaped [1, 8] (perf_analyzer adds the batch dimension); with the
server's default lead-in and lead-out frames a one-frame stream plays that frame,
from one window. The decoder keys a stream's
state by request id; perf_analyzer gives every request its own id within one
run, and the closing end-of-speech drops the state, so every request decodes
exactly one window and leaves nothing behind.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from orpheus_triton.constants import (
    CODEBOOK_SIZE,
    DECODER_TOKENS,
    END_OF_SPEECH,
    IN_MAX_TOKENS,
    IN_SEED,
    IN_TEXT,
    IN_VOICE,
    TOKENS_PER_FRAME,
    VOICES,
)
from orpheus_triton.frames import audio_token_id
from orpheus_triton.loadgen import MAX_TOKENS, TEXTS

DATA = Path(__file__).resolve().parent / "data"
DECODER_ENTRIES = 16


def orpheus_entry(label: str, voice: str, seed: int) -> dict:
    return {IN_TEXT: [TEXTS[label]], IN_VOICE: [voice], IN_MAX_TOKENS: [MAX_TOKENS[label]], IN_SEED: [seed]}


def decoder_entry(rng: random.Random) -> dict:
    ids = [audio_token_id(rng.randrange(CODEBOOK_SIZE), p) for p in range(TOKENS_PER_FRAME)] + [END_OF_SPEECH]
    return {DECODER_TOKENS: {"content": ids, "shape": [1, len(ids)]}}


def write(name: str, entries: list[dict]) -> Path:
    path = DATA / name
    lines = ",\n".join("  " + json.dumps(entry) for entry in entries)  # one entry a line
    path.write_text('{"data": [\n' + lines + "\n]}\n")
    return path


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    DATA.mkdir(exist_ok=True)
    for label in TEXTS:
        write(f"orpheus_{label}.json", [orpheus_entry(label, v, i) for i, v in enumerate(VOICES)])
    labels = list(TEXTS)
    write("orpheus_mixed.json", [orpheus_entry(labels[i % len(labels)], v, i) for i, v in enumerate(VOICES)])
    rng = random.Random(0)
    write("snac_decoder.json", [decoder_entry(rng) for _ in range(DECODER_ENTRIES)])
    print(f"wrote {', '.join(sorted(p.name for p in DATA.glob('*.json')))} in {DATA}")


if __name__ == "__main__":
    main()
