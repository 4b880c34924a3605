"""Task-format samples of the training data module: read from a task file of ``prepare-data``, laid out in one of
the evaluation's two protocols (:func:`polykv_learn.data.layout.prompt_layout`,
:func:`polykv_learn.eval.evaluator.prompt_pieces`).

- ``query_agnostic``: the compressed prefix is the context; the probe is the question, the answer prefix and the
  gold answer.
- ``query_aware``: the compressed prefix is the context and the question; the probe is the answer prefix and the
  gold answer.

Every piece (context, question, footer, answer) is tokenised on its own, as the evaluation does, so a token never
straddles the cut. A row is trained (or validated) in ONE protocol, so its prefill is paid once: per task type the
rows with a question take the listed protocols in turn, in file order (:func:`assign_protocols`). A row without a
question (the answer continues the context) is query-agnostic whatever the list says: there is nothing to move.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from polykv_learn.data.layout import prompt_layout
from polykv_learn.data.tasks import TEST_ONLY_TASKS

__all__ = [
    "QUERY_AGNOSTIC",
    "QUERY_AWARE",
    "TASK_PROTOCOLS",
    "assign_protocols",
    "load_task_rows",
    "split_task_rows",
    "task_pieces",
    "task_probe",
    "task_probe_parts",
]

QUERY_AGNOSTIC = "query_agnostic"
QUERY_AWARE = "query_aware"
#: the evaluation protocols a task row can be trained in (``EvalSettings.query_aware`` False / True)
TASK_PROTOCOLS: tuple[str, ...] = (QUERY_AGNOSTIC, QUERY_AWARE)
#: the split a task file may hold for each use, and how the error message names that use
_USES = {"train": "trained on", "validation": "validated on"}


def task_pieces(row: dict, protocol: str = QUERY_AGNOSTIC) -> tuple[list[str], list[str], str]:
    """(compressed pieces, tail pieces, gold answer) of a task sample in ``protocol``, as the evaluation's text-mode
    prompt splits it; each piece is tokenised on its own. A sample without a question is laid out query-agnostic
    in both protocols (its tail is the footer alone)."""
    if protocol not in TASK_PROTOCOLS:
        raise ValueError(f"protocol must be one of {', '.join(TASK_PROTOCOLS)}, got {protocol!r}")
    layout = prompt_layout(row)
    head = [layout.header] if layout.header else []
    question = [layout.question] if layout.question else []
    if protocol == QUERY_AWARE:
        return head + [layout.context] + question, [layout.footer], layout.answer
    return head + [layout.context], question + [layout.footer], layout.answer


def task_probe_parts(row: dict, protocol: str = QUERY_AGNOSTIC) -> tuple[list[str], str]:
    """The text after the compressed prefix of a task sample, in the pieces the evaluation tokenises separately:
    the prompt's tail (question and answer prefix query-agnostic, the answer prefix alone query-aware) and the gold
    answer."""
    _, tail, answer = task_pieces(row, protocol)
    return tail, answer


def task_probe(row: dict, protocol: str = QUERY_AGNOSTIC) -> str:
    """The text after the compressed prefix of a task sample, laid out as the evaluation's text-mode prompt and
    answer."""
    tail, answer = task_probe_parts(row, protocol)
    return "".join(tail) + answer


def _sample(row: dict, protocol: str) -> dict:
    """The data module's row of a task sample in ``protocol`` (``id``, ``task``, ``source``, ``protocol``, pieces)."""
    context_parts, tail, answer = task_pieces(row, protocol)
    aware = protocol == QUERY_AWARE
    return {
        "id": f"task/{row['id']}",
        "task": row.get("task"),
        "source": f"task:{row.get('task')}" + (f":{QUERY_AWARE}" if aware else ""),
        "protocol": protocol,
        "has_question": bool(row.get("question")),
        "context": row["context"],
        "context_parts": context_parts,
        "probe": "".join(tail) + answer,
        "probe_parts": (tail, answer),
        "raw": row,
    }


def load_task_rows(path: Path, split: str = "train") -> list[dict]:
    """Query-agnostic rows (``id``, ``task``, ``source`` = the task type, pieces) of a task file of ``prepare-data``;
    every line must be of ``split`` (``train`` or ``validation``) and of a task type that is not test-only."""
    if split not in _USES:
        raise ValueError(f"split must be one of {', '.join(_USES)}, got {split!r}")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            row = json.loads(line)
            task, row_split = row.get("task"), row.get("split", "train")
            if row_split != split or task in TEST_ONLY_TASKS:
                raise ValueError(
                    f"{path}:{line_no}: task sample {row.get('id')!r} (task {task!r}, split {row_split!r}) may not be "
                    f"{_USES[split]}: only the {split} split of task types other than {sorted(TEST_ONLY_TASKS)}"
                )
            rows.append(_sample(row, QUERY_AGNOSTIC))
    return rows


def split_task_rows(rows: list[dict], val_count: int) -> tuple[list[dict], list[dict]]:
    """(train, validation): ``val_count`` rows held out for validation, round-robin over the task types from the
    end of each type's rows (in file order), so every type is validated and no row is in both."""
    by_task: dict[str, list[dict]] = {}
    for row in rows:
        by_task.setdefault(row["source"], []).append(row)
    held: set[str] = set()
    for depth in range(max((len(v) for v in by_task.values()), default=0)):
        for name in sorted(by_task):
            if len(held) < val_count and depth < len(by_task[name]):
                held.add(by_task[name][-1 - depth]["id"])
    return [r for r in rows if r["id"] not in held], [r for r in rows if r["id"] in held]


def assign_protocols(rows: Iterable[dict], protocols: Sequence[str]) -> list[dict]:
    """Each row of ``rows`` (query-agnostic, from :func:`load_task_rows`) in one protocol: per task type, the rows
    with a question take ``protocols`` in turn in file order (so each protocol gets an equal share, +-1, of every
    task type); a row without a question stays query-agnostic and takes no turn."""
    if not protocols or any(p not in TASK_PROTOCOLS for p in protocols):
        raise ValueError(f"protocols must be a non-empty list of {', '.join(TASK_PROTOCOLS)}, got {list(protocols)}")
    turns: dict[str, int] = {}
    out = []
    for row in rows:
        if not row["has_question"]:
            out.append(row)
            continue
        turn = turns.get(str(row["task"]), 0)
        turns[str(row["task"])] = turn + 1
        protocol = protocols[turn % len(protocols)]
        out.append(row if protocol == QUERY_AGNOSTIC else _sample(row["raw"], protocol))
    return out
