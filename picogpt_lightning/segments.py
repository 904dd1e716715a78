"""A piece of a rendered conversation: what every chat template (chat_template.py's built-in ones, a pretrained
model's Jinja one) turns messages into, and what conversation.py encodes with its loss mask."""

from __future__ import annotations

from typing import NamedTuple


class Segment(NamedTuple):
    text: str
    trained: bool  # the model learns to write it: an answer and its end
    special: bool = False  # template markup that is the end-of-text token; any other text is encoded as text
