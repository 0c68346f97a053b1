"""TextStream: one generated row's text, released token by token, never splitting a character or passing a stop
string."""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from moe_lightning.serving.tokenizer import ByteTokenizer


class TextStream:
    """Decodes a row's tokens as they arrive.

    A multi-byte UTF-8 character is held until its last byte arrives; text that could be the start of a stop string
    is held until it is known not to be one. When a stop string completes, the text before it is released and the
    stream is ``stopped``: the stop string and anything after it never appear.
    """

    def __init__(self, tokenizer: ByteTokenizer, stop_strings: Sequence[str] = ()) -> None:
        if any(not stop for stop in stop_strings):
            raise ValueError(f"stop strings must not be empty, got {list(stop_strings)}")
        self.tokenizer = tokenizer
        self.stop_strings = tuple(stop_strings)
        self.text = ""
        """Everything released so far."""
        self.stopped = False
        """True once a stop string has completed."""
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self._held = ""

    def push(self, token: int) -> str:
        """Take one token; returns the text it released (often empty while a character or stop string is open)."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(self.tokenizer.token_bytes(token))
        return self._release(final=False)

    def finish(self) -> str:
        """End the row: release the held text (an unfinished character as U+FFFD) unless a stop string ended it."""
        if self.stopped:
            return ""
        self._held += self._decoder.decode(b"", final=True)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        starts = [start for stop in self.stop_strings if (start := self._held.find(stop)) >= 0]
        if starts:
            released, self._held, self.stopped = self._held[:min(starts)], "", True
        else:
            keep = 0 if final else self._open_stop_prefix()
            released, self._held = self._held[:len(self._held) - keep], self._held[len(self._held) - keep:]
        self.text += released
        return released

    def _open_stop_prefix(self) -> int:
        """The length of the longest end of the held text that begins some stop string."""
        longest = 0
        for stop in self.stop_strings:
            for length in range(min(len(stop) - 1, len(self._held)), longest, -1):
                if self._held.endswith(stop[:length]):
                    longest = length
                    break
        return longest
