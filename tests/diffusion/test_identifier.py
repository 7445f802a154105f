"""The rare-identifier warning: silent for a rare single token, loud for a split word, a common word,
or an instance prompt with no identifier at all."""

from __future__ import annotations

from pathlib import Path

from deltatune.diffusion import identifier_warning
from deltatune.diffusion.miniature import build_tokenizer


def test_identifier_warning(tmp_path: Path) -> None:
    tok = build_tokenizer(tmp_path)
    assert identifier_warning(tok, "a photo of a sks bag", "a photo of a bag") is None
    msg = identifier_warning(tok, "a photo of a zwx bag", "a photo of a bag")
    assert msg is not None and "'zwx' is 3 tokens" in msg
    msg = identifier_warning(tok, "a photo of a red bag", "a photo of a bag")
    assert msg is not None and "common word" in msg
    msg = identifier_warning(tok, "a photo of a bag", "a photo of a bag")
    assert msg is not None and "no word" in msg
