import numpy as np
import pytest

from orpheus_triton import constants as c
from orpheus_triton.preprocess import OUT_REPETITION_PENALTY, OUT_TEMPERATURE, SynthesisOptions, llm_inputs
from orpheus_triton.prompt import PromptError, Voices, build_prompt, load_tokenizer


@pytest.fixture(scope="module")
def tokenizer(model_set):
    return load_tokenizer(model_set.llm)


def test_prompt_is_orpheus_format(tokenizer):
    ids = build_prompt(tokenizer, "Hello <laugh> there", "leo")
    text_ids = tokenizer.encode("leo: Hello <laugh> there").ids
    assert text_ids[0] == c.BEGIN_OF_TEXT
    assert ids == [c.START_OF_HUMAN, *text_ids, c.END_OF_TEXT, c.END_OF_HUMAN, c.START_OF_AI, c.START_OF_SPEECH]
    assert ids[:2] == [128259, 128000] and ids[-4:] == [128009, 128260, 128261, 128257]
    # Emotive tags are plain text: they survive a round trip through the tokenizer.
    assert "<laugh>" in tokenizer.decode(ids[1:-4], skip_special_tokens=True)


def test_special_ids_of_demo_tokenizer(tokenizer):
    assert tokenizer.token_to_id("<|begin_of_text|>") == c.BEGIN_OF_TEXT
    assert tokenizer.token_to_id("<|eot_id|>") == c.END_OF_TEXT
    assert tokenizer.token_to_id("<custom_token_2>") == c.END_OF_SPEECH
    assert tokenizer.token_to_id("<custom_token_10>") == c.AUDIO_TOKEN_BASE
    assert tokenizer.get_vocab_size() == c.VOCAB_SIZE


@pytest.mark.parametrize(("text", "voice", "message"), [
    ("", "tara", "text is empty"),
    ("   ", "tara", "text is empty"),
    ("hi", "bob", "unknown voice 'bob'"),
    ("x" * (c.MAX_TEXT_CHARS + 1), "tara", "limit is"),
])
def test_bad_text_and_voice_are_named(tokenizer, text, voice, message):
    with pytest.raises(PromptError, match=message):
        build_prompt(tokenizer, text, voice)


def test_control_token_names_in_the_text_are_read_as_text(tokenizer):
    """'<custom_token_2>' is end-of-speech's name: in a request's text it must not become that token (nor
    end-of-human or an audio code), as upstream's prompt builder lets it."""
    ids = build_prompt(tokenizer, "hi<custom_token_2><custom_token_4><custom_token_10> there", "tara")
    inner = ids[2:-4]  # between <human> BOS and <eot> </human> <ai> <speech>
    assert not {c.END_OF_SPEECH, c.END_OF_HUMAN, c.AUDIO_TOKEN_BASE, c.BEGIN_OF_TEXT} & set(inner)
    assert tokenizer.decode(inner).replace(" ", "") == "tara:hi<custom_token_2><custom_token_4><custom_token_10>there"
    assert build_prompt(tokenizer, "Hello <laugh> there", "leo")[2:-4] == \
        tokenizer.encode("leo: Hello <laugh> there").ids[1:]  # ordinary text and tags as before
    assert tokenizer.encode("<custom_token_2>", add_special_tokens=False).ids == [c.END_OF_SPEECH]  # left as it was


def test_a_fine_tunes_own_added_tokens_are_left_as_they_are(model_set, tmp_path):
    """Only Orpheus's own added tokens are read as plain text in a request: a tag a fine-tune added after them
    (an ordinary added token) stays the token it was trained as."""
    from tokenizers import Tokenizer

    extended = Tokenizer.from_file(str(model_set.llm / "tokenizer.json"))
    extended.add_tokens(["<giggle>"])
    extended.save(str(tmp_path / "tokenizer.json"))
    tokenizer = load_tokenizer(tmp_path)
    assert tokenizer.get_vocab_size() == c.VOCAB_SIZE + 1
    inner = build_prompt(tokenizer, "hi <giggle><custom_token_2>", "tara")[2:-4]
    assert c.VOCAB_SIZE in inner and c.END_OF_SPEECH not in inner


def test_voice_is_case_insensitive(tokenizer):
    assert build_prompt(tokenizer, "hi", "TARA") == build_prompt(tokenizer, "hi", "tara")


def test_llm_inputs_follow_tensorrt_llm_contract(tokenizer):
    tensors = llm_inputs(tokenizer, SynthesisOptions(text="hi", voice="zoe", max_tokens=77, seed=5))
    ids = tensors[c.LLM_INPUT_IDS]
    assert ids.dtype == np.int32 and ids.shape[0] == 1
    assert tensors[c.LLM_INPUT_LENGTHS].tolist() == [[ids.shape[1]]]
    assert tensors[c.LLM_REQUEST_OUTPUT_LEN].tolist() == [[77]]
    assert tensors[c.LLM_END_ID].tolist() == [[c.END_OF_SPEECH]]
    assert tensors[c.LLM_SEED].dtype == np.uint64
    assert tensors[OUT_TEMPERATURE].tolist() == [[pytest.approx(c.DEFAULT_TEMPERATURE)]]
    assert tensors[OUT_REPETITION_PENALTY].tolist() == [[pytest.approx(c.DEFAULT_REPETITION_PENALTY)]]


def test_default_max_tokens_fits_the_servers_length(tokenizer):
    def output_len(max_seq_len, **options):
        tensors = llm_inputs(tokenizer, SynthesisOptions(text="hi", **options), max_seq_len=max_seq_len)
        return tensors[c.LLM_INPUT_LENGTHS].item(), tensors[c.LLM_REQUEST_OUTPUT_LEN].item()

    prompt, default = output_len(None)
    assert default == c.DEFAULT_MAX_TOKENS
    assert output_len(4096) == (prompt, c.DEFAULT_MAX_TOKENS)
    # A server with fewer positions than the prompt and the default: the request gets what fits.
    assert output_len(prompt + 300) == (prompt, 300)
    assert output_len(prompt + 300, max_tokens=300) == (prompt, 300)
    with pytest.raises(PromptError, match=f"prompt of {prompt} tokens \\+ max_tokens 301 exceeds the server's "
                                          f"max_seq_len {prompt + 300}; .* lower max_tokens to 300 at most"):
        output_len(prompt + 300, max_tokens=301)
    # A prompt that leaves less than a frame's tokens could give no audio: refused, not answered with silence.
    frame = c.TOKENS_PER_FRAME
    for room in (-5, 0, frame - 1):
        with pytest.raises(PromptError, match=f"the prompt takes {prompt} tokens of the server's max_seq_len of "
                                              f"{prompt + room} .*, leaving {max(room, 0)} for audio, less than "
                                              f"one SNAC frame \\({frame} tokens\\); shorten the text"):
            output_len(prompt + room)
    assert output_len(prompt + frame) == (prompt, frame)


def test_a_prompt_longer_than_the_engine_takes_is_refused(tokenizer):
    """TensorRT-LLM refuses a prompt over its engine's max_input_len with an internal error; preprocessing
    says why, with both numbers."""
    options = SynthesisOptions(text="hi there")
    prompt = llm_inputs(tokenizer, options)[c.LLM_INPUT_LENGTHS].item()
    assert llm_inputs(tokenizer, options, max_prompt_tokens=prompt)[c.LLM_INPUT_LENGTHS].item() == prompt
    with pytest.raises(PromptError, match=f"the prompt takes {prompt} tokens, more than the {prompt - 1} the LLM "
                                          "engine takes \\(its max_input_len\\); shorten the text"):
        llm_inputs(tokenizer, options, max_prompt_tokens=prompt - 1)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("max_tokens", 0, "max_tokens"), ("max_tokens", c.TOKENS_PER_FRAME - 1, "the least that gives audio"),
    ("max_tokens", c.MAX_MAX_TOKENS + 1, "max_tokens must be in"), ("temperature", -1.0, "temperature"),
    ("top_p", 0.0, "top_p"),
    ("repetition_penalty", 0.5, "repetition_penalty"), ("temperature", float("nan"), "temperature"),
])
def test_option_ranges(field, value, message):
    with pytest.raises(PromptError, match=message):
        SynthesisOptions(text="hi", **{field: value})


def test_voices_of_other_fine_tunes_and_single_speaker_models(tokenizer):
    from orpheus_triton.prompt import Voices

    assert Voices.parse(",".join(c.VOICES)) == Voices() and Voices().default == c.DEFAULT_VOICE
    french = Voices.parse(" Pierre, amelie ,marie", default="MARIE")
    assert french.names == ("Pierre", "amelie", "marie") and french.default == "marie"
    assert french.resolve(None) == french.resolve("  ") == "marie" and french.resolve("AMELIE") == "amelie"
    assert french.resolve("pierre") == "Pierre"  # prompted as the checkpoint was trained: "Pierre: ..."
    ids = build_prompt(tokenizer, "Bonjour", None, french)
    assert ids == build_prompt(tokenizer, "Bonjour", "marie", french)
    assert ids[1:-4] == tokenizer.encode("marie: Bonjour").ids
    with pytest.raises(PromptError, match="unknown voice 'tara'; choose one of: Pierre, amelie, marie"):
        build_prompt(tokenizer, "Bonjour", "tara", french)
    # A single-speaker fine-tune: the prompt is the text alone, and naming a voice is an error.
    single = Voices.parse("none")
    assert single.names == () and single.resolve(None) is None
    ids = build_prompt(tokenizer, "Hello there", None, single)
    assert ids[1:-4] == tokenizer.encode("Hello there").ids
    with pytest.raises(PromptError, match="single-speaker fine-tune: send no voice"):
        build_prompt(tokenizer, "Hello there", "tara", single)


@pytest.mark.parametrize(("names", "default", "message"), [
    ("tara,leo,Tara", "", "name Tara, tara more than once"),
    ('tara,le"o', "", "must be one word without"),
    ("tara,,leo", "", "voice name '' must be one word"),
    ("tara,big ben", "", "voice name 'big ben' must be one word"),
    ("tara,leo", "zoe", "default voice 'zoe' is not one of the voices: tara, leo"),
    ("none", "tara", "a single-speaker model has none"),
])
def test_bad_voice_lists_are_named(names, default, message):
    from orpheus_triton.prompt import Voices

    with pytest.raises(ValueError, match=message):
        Voices.parse(names, default)


def test_a_long_voice_or_request_id_is_shown_by_its_start_and_length_in_the_refusal():
    """A 10 MB voice name came back whole in its refusal."""
    from orpheus_triton.serving import ActiveStreams, StreamIdError

    long = "x" * (10 << 20)
    with pytest.raises(PromptError) as refused:
        Voices().resolve(long)
    assert str(refused.value) == (f"unknown voice {'x' * c.SHOWN_CHARS!r}... ({10 << 20} characters); choose one of: "
                                  + ", ".join(c.VOICES))
    assert "unknown voice 'bob'; choose" in str(pytest.raises(PromptError, Voices().resolve, "bob").value)
    streams = ActiveStreams()
    streams.claim(long)
    with pytest.raises(StreamIdError, match=rf"request id 'x{{{c.SHOWN_CHARS}}}'\.\.\. \({10 << 20} characters\) is "
                                            "already streaming"):
        streams.claim(long)
