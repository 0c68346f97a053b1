"""ByteTokenizer and TextStream: characters never split, stop strings never leaked."""

import pytest

from moe_lightning.serving.text_stream import TextStream
from moe_lightning.serving.tokenizer import ByteTokenizer, tokenizer_for


def pushed(stream: TextStream, text: str) -> list[str]:
    return [stream.push(byte) for byte in text.encode()] + [stream.finish()]


def test_bytes_round_trip_and_special_ids_carry_no_text():
    tokenizer = ByteTokenizer()
    assert tokenizer.encode("añ€") == list("añ€".encode())
    assert tokenizer.decode([*"añ€".encode(), 300]) == "añ€"
    assert tokenizer.decode([0xE2, 0x82]) == "\ufffd"
    assert tokenizer_for(256) is not None and tokenizer_for(300) is not None and tokenizer_for(255) is None


def test_a_lone_surrogate_is_named():
    with pytest.raises(ValueError, match=r"not valid Unicode: .*'\\ud800' at character 1"):
        ByteTokenizer().encode("a\ud800")


def test_multi_byte_characters_are_released_whole():
    assert pushed(TextStream(ByteTokenizer()), "a€b") == ["a", "", "", "€", "b", ""]


def test_an_unfinished_character_ends_as_a_replacement():
    stream = TextStream(ByteTokenizer())
    assert [stream.push(b) for b in "€".encode()[:2]] == ["", ""]
    assert stream.finish() == "\ufffd" and stream.text == "\ufffd"


def test_a_stop_string_is_held_back_then_cut_with_what_follows():
    stream = TextStream(ByteTokenizer(), ["END"])
    assert pushed(stream, "abENxENDyz") == ["a", "b", "", "", "ENx", "", "", "", "", "", ""]
    assert stream.stopped and stream.text == "abENx"


def test_a_held_prefix_that_never_completes_is_released_at_the_end():
    stream = TextStream(ByteTokenizer(), ["END", "\n\n"])
    assert "".join(pushed(stream, "ab\nEN")) == "ab\nEN" and not stream.stopped


def test_the_first_stop_string_to_complete_cuts_the_text():
    stream = TextStream(ByteTokenizer(), ["cd", "bcde"])
    pushed(stream, "abcdef")
    assert stream.text == "ab"


def test_empty_stop_strings_are_refused():
    with pytest.raises(ValueError, match=r"must not be empty, got \['a', ''\]"):
        TextStream(ByteTokenizer(), ["a", ""])
