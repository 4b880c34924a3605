"""The text layout of a task sample around its context: the one definition training and evaluation share.

A sample (``context``, ``question``, ``answer_prefix``, ``answers``) is laid out as

    header + context + question + footer + answer

- text mode (no chat template): ``header = ""``, ``question = "\\n\\n" + question`` (empty for a sample without
  a question, e.g. code completion, whose answer continues the context), ``footer = "\\n" + answer_prefix``;
- chat mode: the user turn ``context + "\\n\\n" + question`` rendered by the tokenizer's chat template with the
  generation prompt; ``header`` is what the template puts before the context, ``question`` stays as above and
  ``footer`` is what it puts after the question, followed by ``answer_prefix``;
- ``answer``: the first gold answer, after a space when the prefix does not end in white space.

Each piece is tokenised on its own (``polykv_learn.eval.evaluator.prompt_pieces``; the training data module's
task probes), so a token never straddles two pieces: where the compression cuts the prompt (after the context
query-agnostic, after the question query-aware) is a piece boundary.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["PromptLayout", "prompt_layout"]

#: renders one user turn with the chat template and the generation prompt (``tokenize=False``)
ChatRender = Callable[[str], str]


@dataclass(frozen=True)
class PromptLayout:
    """The text pieces of one sample (see the module docstring)."""

    header: str
    context: str
    question: str
    footer: str
    answer: str


def prompt_layout(sample: Mapping[str, Any], chat: ChatRender | None = None) -> PromptLayout:
    """Lay ``sample`` out in text mode, or through ``chat`` (a chat-template renderer) when given."""
    context, question, prefix = sample["context"], sample["question"], sample.get("answer_prefix", "")
    if chat is not None:
        user = f"{context}\n\n{question}"
        rendered = chat(user)
        at = rendered.index(user)
        header, footer = rendered[:at], rendered[at + len(user) :] + prefix
    else:
        header, footer = "", "\n" + prefix
    sep = " " if prefix and not prefix[-1].isspace() else ""
    return PromptLayout(header, context, f"\n\n{question}" if question else "", footer, sep + sample["answers"][0])
