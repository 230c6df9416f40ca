"""Text arriving in pieces, cut into sentences and spoken in order with the next sentences running ahead."""

import asyncio
import contextlib

import pytest

from orpheus_triton.text_stream import SentenceSplitter, sentences_of, speak_in_order

CASES = {
    "Hello there. How are you? I'm fine!": ["Hello there.", "How are you?", "I'm fine!"],
    "Dr. Smith met J. R. R. Tolkien, e.g. in 1950. Then he left.":
        ["Dr. Smith met J. R. R. Tolkien, e.g. in 1950.", "Then he left."],
    "It costs 3.50 dollars. Okay.": ["It costs 3.50 dollars.", "Okay."],
    'Wait... what? "Yes," she said. "Go!" He went.': ["Wait... what?", '"Yes," she said.', '"Go!"', "He went."],
    "1. Apples\n2. Pears\n\nThat's all.": ["1. Apples", "2. Pears", "That's all."],
    "Great. <laugh> So anyway,\tthat's   it": ["Great.", "<laugh> So anyway, that's it"],
    "So did I. Then we left.": ["So did I.", "Then we left."],
    "The answer is no. We left.": ["The answer is no.", "We left."],
    "你好。今天天气很好！我们走吧？": ["你好。", "今天天气很好！", "我们走吧？"],
    "你好。 世界很大。 再见！": ["你好。", "世界很大。", "再见！"],
    "終わり。\u3000次の文。": ["終わり。", "次の文。"],
    "  \n ... ": [],
    # Full-width end marks followed by more of them or by closing quotes: the sentence ends after them all.
    "他说：“今天天气很好。”然后走了。": ["他说：“今天天气很好。”", "然后走了。"],
    "真的吗？！太好了。": ["真的吗？！", "太好了。"],
    "「行こう。」彼は言った。": ["「行こう。」", "彼は言った。"],
    "他说：“好。”": ["他说：“好。”"],
    "We met on Jan. 5 and Sept. 12. Okay.": ["We met on Jan. 5 and Sept. 12.", "Okay."],
    # Initialisms and a number's abbreviations before their number: cut there once ("The U.S." "Army...").
    "The U.S. Army is here. Call No. 5 or see p. 12 now. Done.":
        ["The U.S. Army is here.", "Call No. 5 or see p. 12 now.", "Done."],
    "It is No. I refuse. We meet at 7 p.m. Then we eat.": ["It is No.", "I refuse.", "We meet at 7 p.m.",
                                                            "Then we eat."],
}


def split(text: str, max_chars: int = 200, piece: int | None = None) -> list[str]:
    splitter = SentenceSplitter(max_chars)
    pieces = [text[i : i + piece] for i in range(0, len(text), piece)] if piece else [text]
    return [sentence for p in pieces for sentence in splitter.push(p)] + splitter.finish()


@pytest.mark.parametrize("text", CASES)
@pytest.mark.parametrize("piece", [None, 1, 3])
def test_sentences_are_the_same_whole_or_in_pieces(text, piece):
    assert split(text, piece=piece) == CASES[text]


def test_a_sentence_comes_out_as_soon_as_the_next_one_starts():
    splitter = SentenceSplitter()
    assert splitter.push("Hello there.") == []  # "3." or "Dr." could go on
    assert splitter.push(" ") == []
    assert splitter.push("How") == ["Hello there."]
    assert splitter.push(" are you?") == []
    assert splitter.finish() == ["How are you?"]


def test_a_long_sentence_is_cut_at_a_clause_and_never_inside_a_tag():
    text = "This goes on and on, " * 8 + "and ends."
    sentences = split(text, max_chars=60)
    assert all(len(s) <= 60 for s in sentences) and all(s.endswith(",") for s in sentences[:-1])
    assert " ".join(sentences) == " ".join(text.split())
    tagged = "word " * 9 + "<giggle> " + "word " * 9
    sentences = split(tagged, max_chars=50)
    assert all(s.count("<") == s.count(">") for s in sentences) and " ".join(sentences) == " ".join(tagged.split())
    with pytest.raises(ValueError, match="max_chars must be >= 20"):
        SentenceSplitter(5)


@pytest.mark.parametrize("piece", [None, 1, 50])
def test_a_long_sentence_is_cut_even_when_its_end_is_already_there(piece):
    words = "word " * 100  # 500 characters before the sentence ends
    for text in (words + "end. Next one.", words + "\nNext"):
        sentences = split(text, max_chars=200, piece=piece)
        assert max(len(s) for s in sentences) <= 200 and " ".join(sentences) == " ".join(text.split())
    assert split("<" + "x" * 30 + " " + "word " * 50, max_chars=60)[0].startswith("<x")  # an unclosed "<" stays


def test_where_a_long_sentence_is_cut_does_not_depend_on_the_pieces_before_it():
    for length in range(60, 72):  # a clause break near a third of the length limit
        rest = "X" * length + ", " + "more " * 40
        cut_before = SentenceSplitter()
        in_pieces = cut_before.push("Done.\n") + cut_before.push("\n") + cut_before.push(rest) + cut_before.finish()
        assert in_pieces == split("Done.\n\n" + rest), length


def test_a_whole_book_is_split_a_piece_at_a_time(monkeypatch):
    """Pushed at once, a long text was rescanned whole for every sentence cut from it (136 kB took 2.3 s
    before its first sentence): each cut now looks at a piece and what is left of the one before."""
    held = []
    next_cut = SentenceSplitter._next_cut

    def recording(self):
        held.append(len(self.pending))
        return next_cut(self)

    monkeypatch.setattr(SentenceSplitter, "_next_cut", recording)
    for text in ("This is a plain sentence of text. " * 2000, "今天天气很好，我们去公园散步吧。" * 2000):
        held.clear()
        sentences = SentenceSplitter().push(text)
        assert len(sentences) == 1999 and max(held) < 2 * 1024 < len(text)


def test_sentences_of_takes_a_string_an_iterable_or_an_async_iterable():
    async def pieces():
        for word in ("Hi", " there.", " Bye", "."):
            yield word

    async def collect(text):
        return [s async for s in sentences_of(text)]

    want = ["Hi there.", "Bye."]
    assert asyncio.run(collect("Hi there. Bye.")) == want
    assert asyncio.run(collect(["Hi", " there. Bye."])) == want
    assert asyncio.run(collect(pieces())) == want


def test_a_sentence_the_text_pauses_after_is_spoken_without_waiting_for_the_next():
    """A voice agent's "Let me check that for you." before a tool call: its audio came only with the words
    after the call, seconds later."""
    async def main():
        tool_done = asyncio.Event()
        closed = []

        async def reply():
            try:
                yield "Let me check"
                yield " that for you. "
                await tool_done.wait()  # the tool call: nothing comes until its result
                yield "Your order ships on Dr."
                await asyncio.sleep(0.1)  # an abbreviation is no sentence end, pause or not
                yield " Smith's day e.g."
                await asyncio.sleep(0.1)
                yield " Monday!"
                await asyncio.sleep(10)  # closed while this read waits
            finally:
                closed.append(True)

        sentences = sentences_of(reply(), pause_seconds=0.05)
        first = await asyncio.wait_for(anext(sentences), 5)
        tool_done.set()
        rest = [await asyncio.wait_for(anext(sentences), 5)]
        await sentences.aclose()
        return first, rest, closed

    assert run(main()) == ("Let me check that for you.", ["Your order ships on Dr. Smith's day e.g. Monday!"], [True])
    with pytest.raises(ValueError, match="pause_seconds"):
        run(anext(sentences_of("Hi.", pause_seconds=-1)))

    splitter = SentenceSplitter()
    for held, out in (("Fine.", ["Fine."]), ("“Fine!” ", ["“Fine!”"]), ("好。", ["好。"]), ("Fine", []),
                      ("Ask Dr.", []), ("So J.", []), ("1.", []), ("", [])):
        splitter.pending = held
        assert splitter.paused() == out, held
        assert splitter.pending == ("" if out else held)


def test_an_async_source_is_read_by_one_task_from_start_to_end():
    """A voice agent's LLM wrapper may hold an asyncio.timeout, an anyio cancel scope or a context variable
    across its pieces: all need one task. Each read in a task of its own broke them (a timeout that never
    fired, 'cancel scope in a different task', a variable lost at the next piece)."""
    import contextvars

    where = contextvars.ContextVar("where", default="unset")

    async def reply(tasks: list):
        where.set("set in the source")
        for piece in ("First. ", "Second", " one."):
            tasks.append((asyncio.current_task(), where.get()))
            yield piece
            await asyncio.sleep(0.02)

    async def main(pause):
        tasks: list = []
        said = [s async for s in sentences_of(reply(tasks), pause_seconds=pause)]
        return said, tasks

    for pause in (0.01, None):
        said, tasks = run(main(pause))
        assert said == ["First.", "Second one."]
        assert len({task for task, _ in tasks}) == 1 and {value for _, value in tasks} == {"set in the source"}

    async def left_early() -> bool:  # a barge-in: the source's own clean-up runs in the task that read it
        tasks: list = []

        async def endless():
            try:
                while True:
                    tasks.append(asyncio.current_task())
                    yield "More. "
                    await asyncio.sleep(0.01)
            finally:
                tasks.append(asyncio.current_task())

        async with contextlib.aclosing(sentences_of(endless(), pause_seconds=0.01)) as sentences:
            async for _ in sentences:
                break
        return len(set(tasks)) == 1 and len(tasks) >= 2

    assert run(left_early())

    async def cancelled_source():  # the agent's LLM task, cancelled under the source: raised, not waited on
        yield "Hello. "
        raise asyncio.CancelledError

    async def read_all():
        return [s async for s in sentences_of(cancelled_source(), pause_seconds=0.01)]

    with pytest.raises(asyncio.CancelledError):
        run(read_all())


class FakeSpeech:
    """``speak`` for speak_in_order: each sentence yields (sentence, i) for i < 3, one item per loop turn
    (with ``hold``, the items after the first only once ``go`` is set). It records when each sentence
    starts and which streams were closed before their end, and ends every stream it started."""

    def __init__(self, fail_on: str | None = None, hold: bool = False):
        self.log: list[str] = []
        self.closed_early: list[str] = []
        self.ended: list[str] = []
        self.fail_on = fail_on
        self.go = asyncio.Event()
        if not hold:
            self.go.set()

    async def __call__(self, sentence: str):
        self.log.append(f"start {sentence}")
        finished = False
        try:
            for i in range(3):
                await asyncio.sleep(0)
                if i == 1:
                    await self.go.wait()
                if sentence == self.fail_on and i == 1:
                    raise RuntimeError(f"{sentence} failed")
                yield sentence, i
            finished = True
        finally:
            self.ended.append(sentence)
            if not finished:
                self.closed_early.append(sentence)


async def source(*sentences: str):
    for sentence in sentences:
        yield sentence


def run(coroutine):
    return asyncio.run(asyncio.wait_for(coroutine, 10))


def test_the_next_sentence_starts_when_the_one_before_has_finished_generating():
    """Not when it has been played: the consumer here is still on "a"'s first item when "b" starts."""
    speech = FakeSpeech(hold=True)

    async def main():
        heard = []
        async for item in speak_in_order(source("a", "b", "c", "d"), speech):
            heard.append(item)
            if item == ("a", 0):
                await asyncio.sleep(0.01)
                assert speech.log == ["start a"]  # "a" is still generating: nothing else runs beside it
                speech.go.set()  # "a" may finish
                await asyncio.sleep(0.01)
                assert speech.log == ["start a", "start b", "start c"]  # one at a time, two ahead of "a"
        return heard

    assert run(main()) == [(s, i) for s in "abcd" for i in range(3)]
    assert speech.log == ["start a", "start b", "start c", "start d"] and speech.closed_early == []


def test_lookahead_and_concurrency_bound_what_runs_ahead():
    speech = FakeSpeech(hold=True)

    async def main():
        async for item in speak_in_order(source("a", "b", "c", "d"), speech, lookahead=1, concurrency=3):
            if item == ("a", 0):
                await asyncio.sleep(0.01)
                assert speech.log == ["start a", "start b"]  # generating together, one ahead of "a"
                speech.go.set()

    run(main())
    assert speech.log == ["start a", "start b", "start c", "start d"]
    with pytest.raises(ValueError, match="lookahead must be >= 0 and concurrency >= 1"):
        run(anext(speak_in_order(source("a"), speech, concurrency=0)))


def test_leaving_early_closes_every_running_sentence():
    speech = FakeSpeech(hold=True)  # "a" and "b" stay mid-stream

    async def main():
        async with contextlib.aclosing(speak_in_order(source("a", "b", "c"), speech, concurrency=2)) as items:
            async for _ in items:
                await asyncio.sleep(0.01)
                break  # the caller barged in after the first chunk

    run(main())
    assert sorted(speech.closed_early) == ["a", "b"] and "start c" not in speech.log


def test_leaving_early_closes_the_text_source():
    """A barge-in also stops reading the voice agent's LLM reply (its async generator is closed)."""
    closed = []

    async def reply():
        try:
            for sentence in ("One. ", "Two. ", "Three. ", "Four. "):
                yield sentence
                await asyncio.sleep(0)
        finally:
            closed.append(True)

    async def main():
        async with contextlib.aclosing(speak_in_order(sentences_of(reply()), FakeSpeech())) as items:
            async for _ in items:
                break
        return list(closed)

    assert run(main()) == [True]  # closed before leaving the loop, not at the event loop's shutdown

    def plain_reply():  # a plain generator too
        try:
            yield from ("One. ", "Two. ", "Three. ", "Four. ")
        finally:
            closed.append("plain")

    async def plain():
        async with contextlib.aclosing(speak_in_order(sentences_of(plain_reply()), FakeSpeech())) as items:
            async for _ in items:
                break
        return list(closed)

    assert run(plain()) == [True, "plain"]


def test_a_failing_sentence_raises_after_the_audio_before_it_and_closes_the_rest():
    speech = FakeSpeech(fail_on="b")

    async def main():
        heard = []
        with pytest.raises(RuntimeError, match="b failed"):
            async for item in speak_in_order(source("a", "b", "c", "d"), speech, concurrency=3):
                heard.append(item)
        return heard

    assert run(main()) == [("a", 0), ("a", 1), ("a", 2), ("b", 0)]
    started = [entry.removeprefix("start ") for entry in speech.log]
    assert sorted(speech.ended) == sorted(started)  # nothing left running


@pytest.mark.parametrize("where", ["speech", "text"])
def test_a_cancelled_error_inside_a_sentence_or_the_text_source_is_raised_not_waited_on(where):
    """A CancelledError raised inside ``speak`` (a gRPC call cancelled elsewhere) or by the text source is
    not an Exception: it used to leave the consumer waiting for good."""
    async def speak(sentence):
        yield sentence
        if where == "speech" and sentence == "b":
            raise asyncio.CancelledError

    async def text():
        yield "a"
        yield "b"
        if where == "text":
            raise asyncio.CancelledError

    async def main():
        heard = []
        with pytest.raises(asyncio.CancelledError):
            async for item in speak_in_order(text(), speak):
                heard.append(item)
        return heard

    assert run(asyncio.wait_for(main(), 5)) == ["a", "b"]


def test_a_failing_text_source_raises_after_the_sentences_before_it():
    async def broken():
        yield "a"
        raise ConnectionError("the agent's LLM went away")

    async def main():
        heard = []
        with pytest.raises(ConnectionError, match="went away"):
            async for item in speak_in_order(broken(), FakeSpeech()):
                heard.append(item)
        return heard

    assert run(main()) == [("a", 0), ("a", 1), ("a", 2)]
