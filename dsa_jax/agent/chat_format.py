"""DeepSeek-V3.2 chat and tool-call format: messages → prompt text.

Implements the conversation encoding of DeepSeek-V3.2 (paper §4 "thinking in tool-use"; the official
`encoding/encoding_dsv32.py`, `encode_messages` / `render_message`), written from the format, not the code:

    <｜begin▁of▁sentence｜>{system}[\\n\\n{tools}]
    <｜User｜>{user}<｜Assistant｜><think>           (thinking mode, last user turn; else </think>)
    {reasoning}</think>{content}[\\n\\n<｜DSML｜function_calls>…</｜DSML｜function_calls>]<｜end▁of▁sentence｜>
    \\n\\n<function_results>\\n<result>{r1}</result>…\\n</function_results>\\n\\n<think>

Tool-call arguments are DSML parameters: strings raw (`string="true"`), everything else JSON.

Tokenizing (`tokenize_messages`): only the markers the format itself writes become special tokens; what a
user, a tool or a tool call wrote is encoded as plain text even where it spells a marker, so a tool result
holding `<｜end▁of▁sentence｜><｜User｜>` cannot end the turn or forge a user message.

Thinking retention: an assistant turn's reasoning is rendered only while no user (or developer) message has
arrived after it, so reasoning survives tool calls and tool results and is dropped at the next user turn.
Tool calls and tool results themselves always stay. Within one user turn the encoding is prefix-stable:
appending an assistant turn or tool results only appends text, which is what lets a rollout extend its
token sequence instead of re-encoding it.
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Mapping, Sequence, Union

from dsa_jax.data.tokenizer import (
    ASSISTANT, BOS, DSML, EOS, FUNCTION_CALLS_CLOSE, FUNCTION_CALLS_OPEN, INVOKE_CLOSE, INVOKE_OPEN,
    PARAMETER_CLOSE, PARAMETER_OPEN, THINK_END, THINK_START, USER, Tokenizer,
)

MODES = ("thinking", "chat")

FUNCTION_RESULTS_OPEN = "<function_results>"
FUNCTION_RESULTS_CLOSE = "</function_results>"
TOOL_CALLS_START = "\n\n" + FUNCTION_CALLS_OPEN
# Strings that may not appear inside parsed reasoning or content.
SPECIAL_STRINGS = (BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END, DSML)

# The system-prompt text DeepSeek-V3.2 was trained with (encoding_dsv32.py, TOOLS_SYSTEM_TEMPLATE).
_TOOLS_TEMPLATE = f"""## Tools

You have access to a set of tools you can use to answer the user's question.
You can invoke functions by writing a "{FUNCTION_CALLS_OPEN}" block like the following as part of your reply to the user:
{FUNCTION_CALLS_OPEN}
{INVOKE_OPEN} name="$FUNCTION_NAME">
{PARAMETER_OPEN} name="$PARAMETER_NAME" string="true|false">$PARAMETER_VALUE{PARAMETER_CLOSE}
...
{INVOKE_CLOSE}
{INVOKE_OPEN} name="$FUNCTION_NAME2">
...
{INVOKE_CLOSE}
{FUNCTION_CALLS_CLOSE}

String and scalar parameters should be specified as is without any escaping or quotes, while lists and objects should use JSON format. The "string" attribute should be set to "true" for string type parameters and "false" for other types (numbers, booleans, arrays, objects).

If the thinking_mode is enabled, then after function results you should strongly consider outputting a thinking block. Here is an example:

{FUNCTION_CALLS_OPEN}
...
{FUNCTION_CALLS_CLOSE}

{FUNCTION_RESULTS_OPEN}
...
{FUNCTION_RESULTS_CLOSE}

{THINK_START}...thinking about results{THINK_END}

Here are the functions available in JSONSchema format:
<functions>
{{tool_schemas}}
</functions>
"""


def _check_str(owner: str, field: str, value: Any) -> None:
  if not isinstance(value, str):
    raise TypeError(f"{owner}.{field} must be a str, got {type(value).__name__}: {value!r}")


def _check_tools(owner: str, tools: Any) -> None:
  if not isinstance(tools, tuple) or not all(isinstance(t, Mapping) and "name" in t for t in tools):
    raise TypeError(f"{owner}.tools must be a tuple of JSON-schema mappings with a 'name', got {tools!r}")


@dataclasses.dataclass(frozen=True)
class ToolCall:
  """One function call: the tool's name and its arguments (a JSON-compatible mapping)."""

  name: str
  arguments: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    _check_str("ToolCall", "name", self.name)
    if not self.name or '"' in self.name:
      raise ValueError(f"ToolCall.name must be non-empty and free of '\"', got {self.name!r}")
    if not isinstance(self.arguments, Mapping):
      raise TypeError(f"ToolCall.arguments must be a mapping, got {type(self.arguments).__name__}")
    for key in self.arguments:
      if not isinstance(key, str) or not key or '"' in key:
        raise ValueError(f"ToolCall.arguments key {key!r} must be a non-empty str free of '\"'")


@dataclasses.dataclass(frozen=True)
class System:
  content: str = ""
  tools: tuple[Mapping[str, Any], ...] = ()

  def __post_init__(self):
    _check_str("System", "content", self.content)
    _check_tools("System", self.tools)


@dataclasses.dataclass(frozen=True)
class User:
  content: str

  def __post_init__(self):
    _check_str("User", "content", self.content)


@dataclasses.dataclass(frozen=True)
class Developer:
  """A user turn that carries its own tool schemas (DeepSeek's `developer` role)."""

  content: str
  tools: tuple[Mapping[str, Any], ...] = ()

  def __post_init__(self):
    _check_str("Developer", "content", self.content)
    if not self.content:
      raise ValueError("Developer.content must be non-empty")
    _check_tools("Developer", self.tools)


@dataclasses.dataclass(frozen=True)
class Assistant:
  content: str = ""
  reasoning: str = ""
  tool_calls: tuple[ToolCall, ...] = ()

  def __post_init__(self):
    _check_str("Assistant", "content", self.content)
    _check_str("Assistant", "reasoning", self.reasoning)
    if not isinstance(self.tool_calls, tuple) or not all(isinstance(c, ToolCall) for c in self.tool_calls):
      raise TypeError(f"Assistant.tool_calls must be a tuple of ToolCall, got {self.tool_calls!r}")


@dataclasses.dataclass(frozen=True)
class ToolResult:
  """The output of one tool call, in the order of the calls of the preceding assistant turn."""

  content: str

  def __post_init__(self):
    _check_str("ToolResult", "content", self.content)


Message = Union[System, User, Developer, Assistant, ToolResult]


# A rendered span: (text, whether the format wrote it). The format's spans may hold its markers, which become
# special tokens; the other spans (message text, tool schemas, tool names and arguments) are encoded as
# plain text (`Tokenizer.encode_plain`) wherever they spell a marker.
Piece = tuple[str, bool]
MARKERS = (BOS, EOS, USER, ASSISTANT, THINK_START, THINK_END, FUNCTION_CALLS_OPEN, FUNCTION_CALLS_CLOSE,
           INVOKE_OPEN, INVOKE_CLOSE, PARAMETER_OPEN, PARAMETER_CLOSE)
_MARKER_SPLIT = re.compile("(" + "|".join(re.escape(m) for m in sorted(MARKERS, key=len, reverse=True)) + ")")


def _text(pieces: Sequence[Piece]) -> str:
  return "".join(text for text, _ in pieces)


def tokenize_pieces(tokenizer: Tokenizer, pieces: Sequence[Piece]) -> list[int]:
  """Token ids of rendered pieces: each marker the format wrote via `tokenizer.encode` (its special id),
  all text between markers, the format's and the messages' alike, in one `tokenizer.encode_plain` call."""
  ids: list[int] = []
  plain: list[str] = []
  for text, from_format in pieces:
    for part in _MARKER_SPLIT.split(text) if from_format else (text,):
      if from_format and part in MARKERS:
        ids += tokenizer.encode_plain("".join(plain)) + tokenizer.encode(part)
        plain.clear()
      else:
        plain.append(part)
  return ids + tokenizer.encode_plain("".join(plain))


def to_json(value: Any) -> str:
  return json.dumps(value, ensure_ascii=False)


def _tools_pieces(tools: Sequence[Mapping[str, Any]]) -> list[Piece]:
  before, after = _TOOLS_TEMPLATE.split("{tool_schemas}")
  return [(before, True), ("\n".join(to_json(dict(t)) for t in tools), False), (after, True)]


def render_tools(tools: Sequence[Mapping[str, Any]]) -> str:
  return _text(_tools_pieces(tools))


def _tool_call_pieces(calls: Sequence[ToolCall]) -> list[Piece]:
  if not calls:
    return []
  pieces: list[Piece] = [(TOOL_CALLS_START + "\n", True)]
  for i, call in enumerate(calls):
    pieces += [("\n" if i else "", True), (f'{INVOKE_OPEN} name="', True), (call.name, False), ('">\n', True)]
    for j, (key, value) in enumerate(call.arguments.items()):
      string = isinstance(value, str)
      pieces += [("\n" if j else "", True), (f'{PARAMETER_OPEN} name="', True), (key, False),
                 (f'" string="{"true" if string else "false"}">', True), (value if string else to_json(value), False),
                 (PARAMETER_CLOSE, True)]
    pieces.append((f"\n{INVOKE_CLOSE}", True))
  return pieces + [("\n" + FUNCTION_CALLS_CLOSE, True)]


def render_tool_calls(calls: Sequence[ToolCall]) -> str:
  """`\\n\\n<｜DSML｜function_calls>…</｜DSML｜function_calls>`, or "" without calls."""
  return _text(_tool_call_pieces(calls))


def last_user_index(messages: Sequence[Message]) -> int:
  """Index of the last user or developer message, -1 if none."""
  for i in range(len(messages) - 1, -1, -1):
    if isinstance(messages[i], (User, Developer)):
      return i
  return -1


def keeps_reasoning(messages: Sequence[Message], index: int, mode: str) -> bool:
  """Whether the assistant turn at `index` has its reasoning rendered (the thinking-retention rule)."""
  return mode == "thinking" and isinstance(messages[index], Assistant) and index > last_user_index(messages)


def _generation_prefix(messages: Sequence[Message], index: int, mode: str) -> str:
  """`<think>` opens reasoning for the turn the model answers next; `</think>` closes an empty one."""
  return THINK_START if mode == "thinking" and index >= last_user_index(messages) else THINK_END


def _tool_result_pieces(messages: Sequence[Message], index: int, mode: str) -> list[Piece]:
  owner = index - 1
  while owner >= 0 and isinstance(messages[owner], ToolResult):
    owner -= 1
  calls = messages[owner].tool_calls if owner >= 0 and isinstance(messages[owner], Assistant) else ()
  order = index - owner
  if order > len(calls):
    raise ValueError(f"messages[{index}] is ToolResult number {order} after an assistant turn with "
                     f"{len(calls)} tool calls; each ToolResult must answer one call, in order")
  pieces: list[Piece] = [(("\n\n" + FUNCTION_RESULTS_OPEN if order == 1 else "") + "\n<result>", True),
                         (messages[index].content, False), ("</result>", True)]
  if order == len(calls):
    pieces.append(("\n" + FUNCTION_RESULTS_CLOSE + "\n\n" + _generation_prefix(messages, index, mode), True))
  return pieces


def _message_pieces(messages: Sequence[Message], index: int, mode: str) -> list[Piece]:
  msg = messages[index]
  if isinstance(msg, System):
    return [(msg.content, False)] + ([("\n\n", True)] + _tools_pieces(msg.tools) if msg.tools else [])
  if isinstance(msg, Developer):
    tools = [("\n\n", True)] + _tools_pieces(msg.tools) if msg.tools else []
    return ([(USER, True)] + tools + [("\n\n# The user's message is: ", True), (msg.content, False),
                                      (ASSISTANT + _generation_prefix(messages, index, mode), True)])
  if isinstance(msg, User):
    return [(USER, True), (msg.content, False), (ASSISTANT + _generation_prefix(messages, index, mode), True)]
  if isinstance(msg, ToolResult):
    return _tool_result_pieces(messages, index, mode)
  if isinstance(msg, Assistant):
    return _completion_pieces(msg, "thinking" if keeps_reasoning(messages, index, mode) else "chat")
  raise TypeError(f"messages[{index}] has type {type(msg).__name__}; allowed: System, User, Developer, "
                  "Assistant, ToolResult")


def render_message(messages: Sequence[Message], index: int, mode: str) -> str:
  """Text of `messages[index]`, which depends on its neighbours (thinking retention, result grouping)."""
  return _text(_message_pieces(messages, index, mode))


def _messages_pieces(messages: Sequence[Message], mode: str, start: int, add_bos: bool) -> list[Piece]:
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; allowed: {MODES}")
  if not 0 <= start <= len(messages):
    raise ValueError(f"start={start} must lie in [0, {len(messages)}]")
  head = [(BOS, True)] if add_bos and start == 0 else []
  return head + [p for i in range(start, len(messages)) for p in _message_pieces(messages, i, mode)]


def encode_messages(messages: Sequence[Message], mode: str = "thinking", start: int = 0,
                    add_bos: bool = True) -> str:
  """Text of `messages[start:]` rendered in the context of all of `messages`.

  With `start=0` this is the whole prompt (BOS first if `add_bos`). A conversation that ends with a user
  message or a complete set of tool results ends with the generation prefix (`<think>` or `</think>`), so
  the text is ready to be continued by the model. To tokenize it use `tokenize_messages`, not
  `tokenizer.encode` of this text, which would turn markers spelled inside messages into special tokens.
  """
  return _text(_messages_pieces(messages, mode, start, add_bos))


def tokenize_messages(tokenizer: Tokenizer, messages: Sequence[Message], mode: str = "thinking", start: int = 0,
                      add_bos: bool = True) -> list[int]:
  """Token ids of `encode_messages(...)` in which only the format's own markers are special tokens: a user
  message or tool result that spells `<｜end▁of▁sentence｜>` or `<｜User｜>` stays plain text
  (`tokenize_pieces`). For text without such spellings, and the byte tokenizer, this is
  `tokenizer.encode(encode_messages(...))`."""
  return tokenize_pieces(tokenizer, _messages_pieces(messages, mode, start, add_bos))


def _completion_pieces(message: Assistant, mode: str) -> list[Piece]:
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; allowed: {MODES}")
  reasoning = [(message.reasoning, False), (THINK_END, True)] if mode == "thinking" else []
  return reasoning + [(message.content, False)] + _tool_call_pieces(message.tool_calls) + [(EOS, True)]


def render_completion(message: Assistant, mode: str = "thinking") -> str:
  """What the model writes for `message` after a generation prefix: the text `parse.parse_completion` reads."""
  return _text(_completion_pieces(message, mode))


def tokenize_completion(tokenizer: Tokenizer, message: Assistant, mode: str = "thinking") -> list[int]:
  """Token ids of `render_completion(message, mode)` with only the format's markers special
  (`tokenize_messages`)."""
  return tokenize_pieces(tokenizer, _completion_pieces(message, mode))
