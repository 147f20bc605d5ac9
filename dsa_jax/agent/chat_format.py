"""DeepSeek-V3.2 chat and tool-call format: messages → prompt text.

Implements the conversation encoding of DeepSeek-V3.2 (paper §4 "thinking in tool-use"; the official
`encoding/encoding_dsv32.py`, `encode_messages` / `render_message`), written from the format, not the code:

    <｜begin▁of▁sentence｜>{system}[\\n\\n{tools}]
    <｜User｜>{user}<｜Assistant｜><think>           (thinking mode, last user turn; else </think>)
    {reasoning}</think>{content}[\\n\\n<｜DSML｜function_calls>…</｜DSML｜function_calls>]<｜end▁of▁sentence｜>
    \\n\\n<function_results>\\n<result>{r1}</result>…\\n</function_results>\\n\\n<think>

Tool-call arguments are DSML parameters: strings raw (`string="true"`), everything else JSON.

Thinking retention: an assistant turn's reasoning is rendered only while no user (or developer) message has
arrived after it, so reasoning survives tool calls and tool results and is dropped at the next user turn.
Tool calls and tool results themselves always stay. Within one user turn the encoding is prefix-stable:
appending an assistant turn or tool results only appends text, which is what lets a rollout extend its
token sequence instead of re-encoding it.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence, Union

from dsa_jax.data.tokenizer import (
    ASSISTANT, BOS, DSML, EOS, FUNCTION_CALLS_CLOSE, FUNCTION_CALLS_OPEN, INVOKE_CLOSE, INVOKE_OPEN,
    PARAMETER_CLOSE, PARAMETER_OPEN, THINK_END, THINK_START, USER,
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


def to_json(value: Any) -> str:
  return json.dumps(value, ensure_ascii=False)


def render_tools(tools: Sequence[Mapping[str, Any]]) -> str:
  return _TOOLS_TEMPLATE.format(tool_schemas="\n".join(to_json(dict(t)) for t in tools))


def render_tool_calls(calls: Sequence[ToolCall]) -> str:
  """`\\n\\n<｜DSML｜function_calls>…</｜DSML｜function_calls>`, or "" without calls."""
  if not calls:
    return ""
  invokes = []
  for call in calls:
    params = "\n".join(
        f'{PARAMETER_OPEN} name="{key}" string="{"true" if isinstance(value, str) else "false"}">'
        f"{value if isinstance(value, str) else to_json(value)}{PARAMETER_CLOSE}"
        for key, value in call.arguments.items())
    invokes.append(f'{INVOKE_OPEN} name="{call.name}">\n{params}\n{INVOKE_CLOSE}')
  return TOOL_CALLS_START + "\n" + "\n".join(invokes) + "\n" + FUNCTION_CALLS_CLOSE


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


def _render_tool_result(messages: Sequence[Message], index: int, mode: str) -> str:
  owner = index - 1
  while owner >= 0 and isinstance(messages[owner], ToolResult):
    owner -= 1
  calls = messages[owner].tool_calls if owner >= 0 and isinstance(messages[owner], Assistant) else ()
  order = index - owner
  if order > len(calls):
    raise ValueError(f"messages[{index}] is ToolResult number {order} after an assistant turn with "
                     f"{len(calls)} tool calls; each ToolResult must answer one call, in order")
  text = ("\n\n" + FUNCTION_RESULTS_OPEN if order == 1 else "") + f"\n<result>{messages[index].content}</result>"
  if order == len(calls):
    text += "\n" + FUNCTION_RESULTS_CLOSE + "\n\n" + _generation_prefix(messages, index, mode)
  return text


def render_message(messages: Sequence[Message], index: int, mode: str) -> str:
  """Text of `messages[index]`, which depends on its neighbours (thinking retention, result grouping)."""
  msg = messages[index]
  if isinstance(msg, System):
    return msg.content + ("\n\n" + render_tools(msg.tools) if msg.tools else "")
  if isinstance(msg, Developer):
    tools = "\n\n" + render_tools(msg.tools) if msg.tools else ""
    body = f"{tools}\n\n# The user's message is: {msg.content}"
    return USER + body + ASSISTANT + _generation_prefix(messages, index, mode)
  if isinstance(msg, User):
    return USER + msg.content + ASSISTANT + _generation_prefix(messages, index, mode)
  if isinstance(msg, ToolResult):
    return _render_tool_result(messages, index, mode)
  if isinstance(msg, Assistant):
    return render_completion(msg, "thinking" if keeps_reasoning(messages, index, mode) else "chat")
  raise TypeError(f"messages[{index}] has type {type(msg).__name__}; allowed: System, User, Developer, "
                  "Assistant, ToolResult")


def encode_messages(messages: Sequence[Message], mode: str = "thinking", start: int = 0,
                    add_bos: bool = True) -> str:
  """Text of `messages[start:]` rendered in the context of all of `messages`.

  With `start=0` this is the whole prompt (BOS first if `add_bos`). A conversation that ends with a user
  message or a complete set of tool results ends with the generation prefix (`<think>` or `</think>`), so
  the text is ready to be continued by the model.
  """
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; allowed: {MODES}")
  if not 0 <= start <= len(messages):
    raise ValueError(f"start={start} must lie in [0, {len(messages)}]")
  head = BOS if add_bos and start == 0 else ""
  return head + "".join(render_message(messages, i, mode) for i in range(start, len(messages)))


def render_completion(message: Assistant, mode: str = "thinking") -> str:
  """What the model writes for `message` after a generation prefix: the text `parse.parse_completion` reads."""
  if mode not in MODES:
    raise ValueError(f"mode={mode!r}; allowed: {MODES}")
  reasoning = message.reasoning + THINK_END if mode == "thinking" else ""
  return reasoning + message.content + render_tool_calls(message.tool_calls) + EOS
