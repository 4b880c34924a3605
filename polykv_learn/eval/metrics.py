"""LongBench-style answer metrics, each a score in ``[0, 1]``, and the gap-recovery summary.

=================  =========================================================================================
metric             definition
=================  =========================================================================================
``qa_f1``          token F1 after LongBench's ``normalize_answer`` (lower-case, drop punctuation, drop the
                   articles a/an/the, collapse whitespace); max over the gold answers
``rouge_l``        ROUGE-L F1 (precision/recall of the longest common token subsequence, harmonic mean) on
                   lower-cased alphanumeric tokens; max over the gold answers
``classification`` LongBench ``classification_score`` on the prediction's first line (LongBench scores its
                   few-shot tasks on the first line only): the class labels (``all_classes``, default the
                   gold answers) found in it, ignoring labels that are strict substrings of the gold label;
                   ``1/len(matches)`` if the gold label is among them, else 0; max over gold answers
``string_match``   RULER ``string_match_all``: the fraction of gold answers contained in the prediction
                   (case-insensitive)
``code_sim``       LongBench ``code_sim_score``: the first line of the prediction that is not blank and does
                   not start with a comment or fence marker (``#``, ``//``, a backtick), compared stripped
                   with the stripped gold line by ``difflib.SequenceMatcher.ratio``; max over gold answers
=================  =========================================================================================

:func:`answer_settled` tells when more generated text can no longer change a score (a complete first line for
``classification``, a complete first code line for ``code_sim``, every gold answer found for ``string_match``):
decoding may stop there, with the same score.
"""

from __future__ import annotations

import difflib
import math
import re
import string
from collections import Counter
from collections.abc import Callable, Sequence

__all__ = [
    "METRICS",
    "answer_settled",
    "classification",
    "code_sim",
    "gap_recovery",
    "normalize_answer",
    "qa_f1",
    "rouge_l",
    "score",
    "string_match",
]

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """LongBench/SQuAD normalisation: lower-case, remove punctuation, articles and extra whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _f1(pred_tokens: Sequence[str], gold_tokens: Sequence[str]) -> float:
    """Bag-of-tokens F1."""
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def qa_f1(prediction: str, answers: Sequence[str]) -> float:
    """Token F1 of the normalised prediction against each gold answer; the best one."""
    pred = normalize_answer(prediction).split()
    return max((_f1(pred, normalize_answer(a).split()) for a in answers), default=0.0)


def _rouge_tokens(text: str) -> list[str]:
    return re.findall(r"[a-z0-9]+", text.lower())


def _lcs(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (O(len(a) * len(b)) time, O(len(b)) memory)."""
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0]
        for j, y in enumerate(b):
            cur.append(prev[j] + 1 if x == y else max(prev[j + 1], cur[j]))
        prev = cur
    return prev[-1]


def rouge_l(prediction: str, answers: Sequence[str]) -> float:
    """ROUGE-L F1 of the prediction against each gold answer; the best one."""
    pred = _rouge_tokens(prediction)
    best = 0.0
    for answer in answers:
        gold = _rouge_tokens(answer)
        lcs = _lcs(pred, gold) if pred and gold else 0
        if lcs:
            precision, recall = lcs / len(pred), lcs / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def _first_line(text: str) -> str:
    return text.lstrip("\n").split("\n")[0]


def classification(prediction: str, answers: Sequence[str], all_classes: Sequence[str] | None = None) -> float:
    """LongBench classification score (see the module table); ``all_classes`` defaults to ``answers``."""
    classes = list(all_classes) if all_classes else list(answers)
    prediction = _first_line(prediction)
    best = 0.0
    for gold in answers:
        matches = [c for c in classes if c in prediction and not (c in gold and c != gold)]
        if gold in matches:
            best = max(best, 1.0 / len(matches))
    return best


def string_match(prediction: str, answers: Sequence[str]) -> float:
    """Fraction of gold answers found (case-insensitively) in the prediction."""
    if not answers:
        return 0.0
    pred = prediction.lower()
    return sum(a.lower() in pred for a in answers) / len(answers)


def _first_code_line(prediction: str) -> str:
    for line in prediction.lstrip("\n").split("\n"):
        stripped = line.strip()
        if stripped and not stripped.startswith(("#", "//", "`")):
            return stripped
    return ""


def code_sim(prediction: str, answers: Sequence[str]) -> float:
    """Similarity of the first code line of the prediction to each gold line; the best one."""
    line = _first_code_line(prediction)
    return max((difflib.SequenceMatcher(None, line, a.strip()).ratio() for a in answers), default=0.0)


METRICS: dict[str, Callable[..., float]] = {
    "string_match": string_match,
    "qa_f1": qa_f1,
    "rouge_l": rouge_l,
    "classification": classification,
    "code_sim": code_sim,
}
"""Metric name -> function ``fn(prediction, answers, **kw) -> float`` in ``[0, 1]``."""


def score(metric: str, prediction: str, answers: Sequence[str], **kw: object) -> float:
    """Score ``prediction`` with the named metric. Only ``classification`` takes a keyword (``all_classes``);
    other keywords are ignored so callers can pass a whole sample's optional fields."""
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; allowed: {', '.join(METRICS)}")
    if metric == "classification":
        return classification(prediction, answers, kw.get("all_classes"))  # type: ignore[arg-type]
    return METRICS[metric](prediction, answers)


def answer_settled(metric: str, text: str, answers: Sequence[str] | None = None) -> bool:
    """True when no continuation of the generated ``text`` can change its score under ``metric`` (scores are
    taken on the stripped text): its first line is complete (``classification``), its first code line is
    complete (``code_sim``), or it already contains every gold answer (``string_match``, whose score can only
    grow with more text; needs ``answers``). Never for the metrics that read the whole answer."""
    lines = text.lstrip().split("\n")[:-1]  # the complete lines
    if metric == "classification":
        return bool(lines)
    if metric == "code_sim":
        return any(_first_code_line(line) for line in lines)
    if metric == "string_match":
        return bool(answers) and string_match(text.strip(), answers) == 1.0  # type: ignore[arg-type]
    return False


def gap_recovery(learned: float | None, best_single: float | None, full: float | None) -> float | None:
    """Share of the gap between the best single policy and the full cache that ``learned`` recovers:
    ``(learned - best_single) / (full - best_single)``. 1 means full-cache quality, 0 no gain over the best
    single policy, negative worse than it. Returns ``None`` when an input is ``None`` or NaN, or when there is
    no gap (``full == best_single`` up to 1e-12), where the ratio is undefined."""
    values = (learned, best_single, full)
    if any(v is None or math.isnan(v) for v in values):
        return None
    assert learned is not None and best_single is not None and full is not None
    gap = full - best_single
    if abs(gap) <= 1e-12:
        return None
    return (learned - best_single) / gap
