"""Tokenizer, chat template, incremental detokenizer (UTF-8 safe), stop strings."""

from __future__ import annotations

import random

import pytest

from slora_backend.tokenizer import REPLACEMENT_CHAR, StopStringMatcher, Tokenizer

TEXTS = [
    "Héllo wörld! Ça va? Ñandú, naïve café, Crème brûlée.",
    "Emoji: 😀🎉👍🏽 family 👨‍👩‍👧 and flags 🇫🇷🇯🇵 done.",
    "Mixed 日本語のテキスト, 한국어, العربية and ελληνικά; ok",
    "  leading spaces\n\ttabs and newlines\n\nend",
]


@pytest.fixture(scope="module")
def tok(smollm_dir):
    return Tokenizer(smollm_dir)



def feed_until_stop(stream, ids: list[int]) -> tuple[str, bool]:
    """Feed tokens one by one until a stop string hits: (text emitted, hit)."""
    emitted = ""
    for t in ids:
        out, hit = stream.add(t)
        emitted += out
        if hit:
            return emitted, True
    return emitted, False

def test_encode_text_and_chat(tok):
    assert tok.encode("Hello world") == tok.hf("Hello world")["input_ids"]
    ids = tok.encode([{"role": "user", "content": "hi"}])
    text = tok.decode(ids, skip_special_tokens=False)
    assert text.startswith("<|im_start|>system") and text.endswith("<|im_start|>assistant\n")
    assert "<|im_start|>user\nhi<|im_end|>" in text
    assert tok.eos_token_id == 2


def test_bad_chat_message(tok):
    with pytest.raises(ValueError, match="role"):
        tok.encode([{"content": "no role"}])


@pytest.mark.parametrize("text", TEXTS)
def test_incremental_detokenizer_never_splits_characters(tok, text):
    ids = tok.encode(text)
    prompt = tok.encode("Some prompt before:")
    # fed one token at a time, then in random chunks
    for chunking in ("one", "random"):
        d = tok.detokenizer(prompt)
        pieces = []
        rng = random.Random(0)
        i = 0
        while i < len(ids):
            n = 1 if chunking == "one" else rng.randint(1, 3)
            piece = d.add(ids[i : i + n])
            i += n
            assert REPLACEMENT_CHAR not in piece
            piece.encode("utf-8")  # valid
            pieces.append(piece)
        pieces.append(d.flush())
        assert "".join(pieces) == tok.decode(ids)


def test_detokenizer_holds_back_a_split_emoji(tok):
    ids = tok.encode(" 😀")
    assert len(ids) >= 2  # the emoji's bytes are split across tokens
    d = tok.detokenizer()
    assert d.add(ids[0]) == ""  # first token alone is an incomplete character
    rest = "".join(d.add(t) for t in ids[1:])
    assert rest == " 😀"


def test_detokenizer_flush_emits_incomplete_tail(tok):
    ids = tok.encode("a😀")
    d = tok.detokenizer()
    out = "".join(d.add(t) for t in ids[:-1])
    out += d.flush()
    assert out == tok.decode(ids[:-1])


def test_special_tokens_skipped(tok):
    d = tok.detokenizer()
    ids = tok.encode("Hi there") + [tok.eos_token_id]
    out = "".join(d.add(t) for t in ids) + d.flush()
    assert out == "Hi there"


# ---- stop strings ------------------------------------------------------------------------------


def _feed_all(m: StopStringMatcher, pieces):
    out = []
    for p in pieces:
        o, hit = m.feed(p)
        out.append(o)
        if hit:
            return "".join(out), True
    out.append(m.flush())
    return "".join(out), False


def test_stop_string_across_pieces_truncates():
    m = StopStringMatcher(["STOP"])
    text, hit = _feed_all(m, ["hello S", "T", "O", "P and more"])
    assert hit and text == "hello "


def test_stop_prefix_held_back_then_released():
    m = StopStringMatcher(["</end>"])
    o1, h1 = m.feed("value </e")
    assert (o1, h1) == ("value ", False)  # "</e" might start the stop string
    o2, h2 = m.feed("xtra")
    assert (o2, h2) == ("</extra", False)


def test_earliest_of_several_stops_wins():
    m = StopStringMatcher(["world", "lo w"])
    text, hit = _feed_all(m, ["hel", "lo world"])
    assert hit and text == "hel" and m.matched == "lo w"


def test_no_stop_flushes_everything():
    m = StopStringMatcher(["xyz"])
    assert _feed_all(m, ["abc x", "y"]) == ("abc xy", False)


def test_stream_with_stop_on_real_tokens(tok):
    text = "The answer is 42. Done! Then more text follows."
    ids = tok.encode(text)
    s = tok.stream(tok.encode("Q:"), stop=["Done!"])
    emitted, hit = feed_until_stop(s, ids)
    assert hit and emitted == "The answer is 42. "
    assert s.finish() == ""


def test_stream_finish_releases_held_text(tok):
    ids = tok.encode("ends with Do")
    s = tok.stream(None, stop=["Done!"])
    out = "".join(s.add(t)[0] for t in ids)
    assert out == "ends with "
    assert s.finish() == "Do"
    assert s.text == "ends with Do"


def test_stop_inside_emoji_text(tok):
    text = "α😀β STOP γ"
    ids = tok.encode(text)
    s = tok.stream(None, stop=["β S"])
    out, hit = feed_until_stop(s, ids)
    assert hit and out == "α😀"
