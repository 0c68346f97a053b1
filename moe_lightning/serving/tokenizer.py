"""ByteTokenizer: text as its UTF-8 bytes, one token per byte, the tokenizer of byte-level models."""

from __future__ import annotations

from collections.abc import Iterable

BYTE_VOCAB_SIZE = 256


class ByteTokenizer:
    """Token ``b`` (0..255) is the byte ``b``; ids from 256 up (special tokens of a larger vocab) carry no text."""

    def encode(self, text: str) -> list[int]:
        """The UTF-8 bytes of ``text``; raises ``ValueError`` naming a lone surrogate, which has no UTF-8 form."""
        try:
            return list(text.encode("utf-8"))
        except UnicodeEncodeError as error:
            raise ValueError(
                f"text is not valid Unicode: {error.reason} {text[error.start:error.end]!r} at character {error.start}"
            ) from error

    def token_bytes(self, token: int) -> bytes:
        """The bytes token ``token`` stands for (none for a special token)."""
        return bytes([token]) if 0 <= token < BYTE_VOCAB_SIZE else b""

    def decode(self, tokens: Iterable[int]) -> str:
        """The text of ``tokens``; byte sequences that are not UTF-8 become U+FFFD."""
        return b"".join(self.token_bytes(token) for token in tokens).decode("utf-8", errors="replace")


def tokenizer_for(vocab_size: int) -> ByteTokenizer | None:
    """The tokenizer of a model with ``vocab_size`` tokens: bytes need 256 ids, so a smaller vocab has none."""
    return ByteTokenizer() if vocab_size >= BYTE_VOCAB_SIZE else None
