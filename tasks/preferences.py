"""Preference data in the formats it is published in, normalised to alignflow's pairs format.

alignflow's pairs format is a table with columns `prompt`, `chosen`, `rejected` (any other
columns are kept). Its values are either all plain text (strings) or all conversational:
a list of {role, content} messages, stored in Arrow as list<struct<role: string, content: string>>;
a conversational `prompt` is the conversation so far, `chosen`/`rejected` hold the assistant's
reply (one or more assistant messages). tasks/models.py renders conversational values through the
model's chat template.

Formats read (`normalise_preferences(data, format)`):

- "preferences": trl's preference formats, detected from the columns and the first values:
  - explicit prompt, plain text:      {"prompt": "The sky is", "chosen": "blue.", "rejected": "green."}
  - explicit prompt, conversational:  {"prompt": [{"role": "user", ...}], "chosen": [{"role": "assistant", ...}], ...}
  - implicit prompt, conversational:  {"chosen": [user, assistant], "rejected": [user, assistant]}; the
    prompt is every message before the final assistant message, which must be the same in both.
    A `prompt` column of the other kind (a plain-text prompt beside full conversations, as in
    UltraFeedback-binarized) is replaced by the extracted conversational prompt, as trl does.
  - implicit prompt, plain text:      {"chosen": "Q: hi A: hello", "rejected": "Q: hi A: go away"}; the
    prompt is the longest shared prefix, cut back to a whitespace boundary so that no word is
    split; the responses are the rest, stripped of surrounding whitespace.
- "hh_rlhf": Anthropic's HH-RLHF (`chosen`/`rejected` are whole dialogues,
  "\\n\\nHuman: ...\\n\\nAssistant: ...", differing in the final assistant reply). The prompt is the
  dialogue up to and including its last "\\n\\nAssistant:"; the responses are the final replies,
  stripped of surrounding whitespace (the leading space, mostly), as alignflow's generated
  responses are.

A row that cannot make a pair is dropped and counted under one reason (the first that applies):
    dropped_missing          a required field is absent or null
    dropped_malformed        a value of the wrong shape: not a string / not a list of {role, content}
                             messages; a conversational response that is not assistant messages;
                             an HH dialogue without a final "Assistant:" turn
    dropped_prefix_mismatch  chosen and rejected do not share the same dialogue before the final
                             reply (implicit conversational, HH)
    dropped_empty            an empty prompt or an empty response (after stripping whitespace)
    dropped_identical        chosen equal to rejected
With strict=True the first such row raises BadInput naming the file, the row, the field and
what was expected instead. No usable rows at all is always a BadInput.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Literal

import pyarrow as pa

from tasks.base import BadInput

PAIR_COLUMNS = ("prompt", "chosen", "rejected")
DROP_REASONS = ("missing", "malformed", "prefix_mismatch", "empty", "identical")
PreferenceFormat = Literal["preferences", "hh_rlhf"]

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])
MESSAGES = pa.list_(MESSAGE)  # a conversational value in a table

HH_ASSISTANT = "\n\nAssistant:"
HH_HUMAN = "\n\nHuman:"

Pair = tuple[Any, Any, Any]  # (prompt, chosen, rejected)


class Dropped(Exception):
    """A row that cannot make a pair: why (one of DROP_REASONS), which field, what was expected."""

    def __init__(self, reason: str, field: str, expected: str):
        assert reason in DROP_REASONS, reason
        self.reason, self.field, self.expected = reason, field, expected
        super().__init__(f"{field}: {expected}")


# ---- values ---------------------------------------------------------------------------------


def is_conversation(value: Any) -> bool:
    """A list of {role, content} messages (the test everything else uses: a list means a chat)."""
    return isinstance(value, (list, tuple)) and all(
        isinstance(m, dict) and "role" in m and "content" in m for m in value
    )


def _text(row: dict, field: str) -> str:
    value = row.get(field)
    if value is None:
        raise Dropped("missing", field, "a value (the field is missing or null)")
    if not isinstance(value, str):
        raise Dropped("malformed", field, f"a string, got {type(value).__name__}")
    return value


def _messages(row: dict, field: str) -> list[dict]:
    value = row.get(field)
    if value is None:
        raise Dropped("missing", field, "a list of messages (the field is missing or null)")
    if not isinstance(value, (list, tuple)):
        raise Dropped("malformed", field, f"a list of {{role, content}} messages, got {type(value).__name__}")
    messages = []
    for i, message in enumerate(value, start=1):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise Dropped("malformed", field, f"message {i} as {{role, content}} with string values")
        messages.append({"role": message["role"], "content": message["content"]})
    return messages


def _nonempty_text(text: str, field: str, what: str = "a non-empty response") -> None:
    if not text.strip():
        raise Dropped("empty", field, f"{what} (it is empty after stripping whitespace)")


def _assistant_reply(messages: list[dict], field: str) -> None:
    """A conversational response: one or more assistant messages with some content."""
    if not messages:
        raise Dropped("empty", field, "at least one assistant message (the list is empty)")
    for i, message in enumerate(messages, start=1):
        if message["role"] != "assistant":
            raise Dropped("malformed", field, f"only assistant messages (the prompt goes in 'prompt'); "
                                              f"message {i} has role {message['role']!r}")
    _nonempty_text("".join(m["content"] for m in messages), field, "a non-empty assistant reply")


def _not_identical(chosen: Any, rejected: Any) -> None:
    if chosen == rejected:
        raise Dropped("identical", "rejected", "a response different from 'chosen'")


# ---- one row of each format -----------------------------------------------------------------


def explicit_text_pair(row: dict) -> Pair:
    prompt, chosen, rejected = (_text(row, f) for f in PAIR_COLUMNS)
    _nonempty_text(prompt, "prompt", "a non-empty prompt")
    _nonempty_text(chosen, "chosen")
    _nonempty_text(rejected, "rejected")
    _not_identical(chosen.strip(), rejected.strip())
    return prompt, chosen, rejected


def explicit_chat_pair(row: dict) -> Pair:
    prompt, chosen, rejected = (_messages(row, f) for f in PAIR_COLUMNS)
    if not prompt:
        raise Dropped("empty", "prompt", "at least one message (the list is empty)")
    _assistant_reply(chosen, "chosen")
    _assistant_reply(rejected, "rejected")
    _not_identical(chosen, rejected)
    return prompt, chosen, rejected


def implicit_chat_pair(row: dict) -> Pair:
    chosen, rejected = _messages(row, "chosen"), _messages(row, "rejected")
    for field, conversation in (("chosen", chosen), ("rejected", rejected)):
        if not conversation or conversation[-1]["role"] != "assistant":
            raise Dropped("malformed", field, "a conversation that ends with an assistant message")
    if chosen[:-1] != rejected[:-1]:
        raise Dropped("prefix_mismatch", "rejected",
                      "the same messages as 'chosen' before the final assistant message")
    if not chosen[:-1]:
        raise Dropped("empty", "chosen", "messages before the final assistant message (the prompt)")
    _assistant_reply(chosen[-1:], "chosen")
    _assistant_reply(rejected[-1:], "rejected")
    _not_identical(chosen[-1:], rejected[-1:])
    return chosen[:-1], chosen[-1:], rejected[-1:]


def shared_prefix_at_word_boundary(a: str, b: str) -> int:
    """Length of the longest common prefix of a and b, cut back so that it splits no word."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1

    def ends_word(text: str) -> bool:  # the cut at n falls between words of `text`
        return n == len(text) or text[n].isspace()

    if n == 0 or a[n - 1].isspace() or (ends_word(a) and ends_word(b)):
        return n
    while n > 0 and not a[n - 1].isspace():
        n -= 1
    return n


def implicit_text_pair(row: dict) -> Pair:
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    _nonempty_text(chosen, "chosen")
    _nonempty_text(rejected, "rejected")
    _not_identical(chosen.strip(), rejected.strip())
    cut = shared_prefix_at_word_boundary(chosen, rejected)
    prompt = chosen[:cut].rstrip()
    _nonempty_text(prompt, "prompt", "a shared prompt (chosen and rejected share no leading words)")
    chosen, rejected = chosen[cut:].strip(), rejected[cut:].strip()
    _nonempty_text(chosen, "chosen", "a response after the shared prompt")
    _nonempty_text(rejected, "rejected", "a response after the shared prompt")
    return prompt, chosen, rejected


def split_hh_dialogue(text: str, field: str) -> tuple[str, str]:
    """(prompt up to and including the last "\\n\\nAssistant:", the final reply stripped)."""
    at = text.rfind(HH_ASSISTANT)
    if at < 0:
        raise Dropped("malformed", field, "a dialogue with a '\\n\\nAssistant:' turn")
    cut = at + len(HH_ASSISTANT)
    reply = text[cut:]
    if HH_HUMAN in reply:
        raise Dropped("malformed", field, "a dialogue that ends with an assistant turn")
    return text[:cut], reply.strip()


def hh_rlhf_pair(row: dict) -> Pair:
    chosen, rejected = _text(row, "chosen"), _text(row, "rejected")
    prompt, chosen_reply = split_hh_dialogue(chosen, "chosen")
    rejected_prompt, rejected_reply = split_hh_dialogue(rejected, "rejected")
    if prompt != rejected_prompt:
        raise Dropped("prefix_mismatch", "rejected",
                      "the same dialogue as 'chosen' before the final '\\n\\nAssistant:' reply")
    _nonempty_text(chosen_reply, "chosen", "a non-empty final assistant reply")
    _nonempty_text(rejected_reply, "rejected", "a non-empty final assistant reply")
    _not_identical(chosen_reply, rejected_reply)
    return prompt, chosen_reply, rejected_reply


# ---- tables ---------------------------------------------------------------------------------


def _first_value(rows: list[dict], field: str) -> Any:
    return next((row[field] for row in rows if row.get(field) not in (None, [], ())), None)


def detect_layout(columns: Iterable[str], rows: list[dict]) -> tuple[Literal["explicit", "implicit"], bool]:
    """trl's layout of preference rows: ("explicit" or "implicit" prompt, conversational or not).

    Conversational iff the first non-null `chosen` is a list. The prompt is explicit iff there is a
    `prompt` column whose first value is of the same kind (text or conversation) as `chosen`.
    """
    conversational = isinstance(_first_value(rows, "chosen"), (list, tuple))
    prompt = _first_value(rows, "prompt") if "prompt" in columns else None
    explicit = prompt is not None and isinstance(prompt, (list, tuple)) == conversational
    return ("explicit" if explicit else "implicit"), conversational


def pair_function(format: PreferenceFormat, columns: Iterable[str], rows: list[dict]) -> tuple[Callable[[dict], Pair], bool]:
    """The row function for `format` (detected for "preferences") and whether its values are chats."""
    if format == "hh_rlhf":
        return hh_rlhf_pair, False
    if format != "preferences":
        raise ValueError(f"unknown preference format {format!r}")
    layout, conversational = detect_layout(columns, rows)
    functions = {
        ("explicit", False): explicit_text_pair,
        ("explicit", True): explicit_chat_pair,
        ("implicit", False): implicit_text_pair,
        ("implicit", True): implicit_chat_pair,
    }
    return functions[layout, conversational], conversational


def normalise_preferences(
    data: pa.Table | list[dict],
    format: PreferenceFormat = "preferences",
    *,
    strict: bool = False,
    file: str = "table",
    row_labels: list[str] | None = None,
) -> tuple[pa.Table, dict[str, int]]:
    """`data` (an Arrow table, or rows as dicts) as a pairs table, and how many rows were dropped why.

    Returns (table, {"dropped_missing": n, "dropped_malformed": n, "dropped_prefix_mismatch": n,
    "dropped_empty": n, "dropped_identical": n}). The table's columns are prompt, chosen, rejected,
    then the input's other columns in their order (an input `prompt` column is replaced).
    `file` and `row_labels` (default "row 1", "row 2", ...) name the rows in errors.
    """
    if isinstance(data, pa.Table):
        columns = list(data.column_names)
        rows = data.select([c for c in PAIR_COLUMNS if c in columns]).to_pylist()
    else:
        rows = list(data)
        columns = list(dict.fromkeys(key for row in rows for key in row))
    if not rows:
        raise BadInput(file, "rows", "at least one row")
    for required in ("chosen", "rejected"):
        if required not in columns:
            raise BadInput(file, required, f"a column {required!r} (the data has {columns})")

    to_pair, conversational = pair_function(format, columns, rows)
    counts = {f"dropped_{reason}": 0 for reason in DROP_REASONS}
    kept: list[int] = []
    pairs: dict[str, list] = {c: [] for c in PAIR_COLUMNS}
    for i, row in enumerate(rows):
        try:
            pair = to_pair(row)
        except Dropped as dropped:
            if strict:
                label = row_labels[i] if row_labels else f"row {i + 1}"
                raise BadInput(file, f"{label}: {dropped.field}", dropped.expected) from None
            counts[f"dropped_{dropped.reason}"] += 1
            continue
        kept.append(i)
        for column, value in zip(PAIR_COLUMNS, pair):
            pairs[column].append(value)
    if not kept:
        reasons = ", ".join(f"{n} {k.removeprefix('dropped_')}" for k, n in counts.items() if n)
        raise BadInput(file, "rows", f"at least one usable preference pair; all {len(rows)} rows were dropped ({reasons})")

    value_type = MESSAGES if conversational else pa.string()
    table = pa.table({c: pa.array(pairs[c], type=value_type) for c in PAIR_COLUMNS})
    others = [c for c in columns if c not in PAIR_COLUMNS]
    if others:
        if isinstance(data, pa.Table):
            rest = data.select(others).take(pa.array(kept, type=pa.int64()))
        else:
            try:
                rest = pa.Table.from_pylist([{c: rows[i].get(c) for c in others} for i in kept])
            except (pa.ArrowInvalid, pa.ArrowTypeError) as e:
                raise BadInput(file, "rows", f"one type per column ({e})") from None
        for column in others:
            table = table.append_column(rest.schema.field(column), rest.column(column))
    return table, counts
