"""Model output → reasoning, content and tool calls (DeepSeek-V3.2 format, spec §4).

The inverse of `chat_format.render_completion`, mirroring `parse_message_from_completion_text` of the
official `encoding_dsv32.py`, but total: malformed output (unclosed `</think>` or function-call block, bad
JSON in a non-string parameter, an unknown tool, stray special tokens, text after the call block) yields a
`ParseError` value that names what went wrong and where; no exception escapes. Whitespace between DSML tags
is tolerated; parameter values are taken verbatim (`string="true"`) or as JSON (`string="false"`).
"""

from __future__ import annotations

import dataclasses
import json
import re
from typing import Any, Collection, Optional, Union

from dsa_jax.agent.chat_format import MODES, SPECIAL_STRINGS, TOOL_CALLS_START, Assistant, ToolCall
from dsa_jax.data.tokenizer import (
    EOS, FUNCTION_CALLS_CLOSE, INVOKE_CLOSE, INVOKE_OPEN, PARAMETER_CLOSE, PARAMETER_OPEN, THINK_END,
)

ERROR_KINDS = (
    "unclosed_thinking", "unclosed_tool_calls", "malformed_tool_call", "bad_json", "unknown_tool",
    "duplicate_parameter", "special_token_in_text", "text_after_tool_calls", "bad_mode",
)

_INVOKE_HEADER = re.compile(r'\s+name="([^"]*)"\s*>')
_PARAMETER_HEADER = re.compile(r'\s+name="([^"]*)"\s+string="(true|false)"\s*>')


@dataclasses.dataclass(frozen=True)
class ParseError:
  """Why a completion could not be read: `kind` (one of ERROR_KINDS), a readable `detail`, the char `offset`."""

  kind: str
  detail: str
  offset: int


class _Fail(Exception):
  """Internal: unwinds the block parser to `parse_completion`, which turns it into a ParseError."""

  def __init__(self, kind: str, detail: str, offset: int):
    super().__init__(detail)
    self.error = ParseError(kind, detail, offset)


def _skip_ws(text: str, pos: int) -> int:
  while pos < len(text) and text[pos].isspace():
    pos += 1
  return pos


def _parse_value(raw: str, is_string: str, where: int) -> Any:
  if is_string == "true":
    return raw
  try:
    return json.loads(raw)
  except (ValueError, RecursionError) as e:
    raise _Fail("bad_json", f"parameter value {raw[:80]!r} with string=\"false\" is not JSON: {e}", where)


def _parse_invoke(text: str, pos: int, tool_names: Optional[Collection[str]]) -> tuple[ToolCall, int]:
  header = _INVOKE_HEADER.match(text, pos + len(INVOKE_OPEN))
  if header is None:
    raise _Fail("malformed_tool_call", f'expected {INVOKE_OPEN} name="…">', pos)
  name = header.group(1)
  if tool_names is not None and name not in tool_names:
    raise _Fail("unknown_tool", f"tool {name!r} is not one of {sorted(tool_names)}", pos)
  arguments: dict[str, Any] = {}
  pos = header.end()
  while True:
    pos = _skip_ws(text, pos)
    if text.startswith(INVOKE_CLOSE, pos):
      pos += len(INVOKE_CLOSE)
      break
    if not text.startswith(PARAMETER_OPEN, pos):
      raise _Fail("malformed_tool_call", f"expected {PARAMETER_OPEN} or {INVOKE_CLOSE} in call of {name!r}", pos)
    param = _PARAMETER_HEADER.match(text, pos + len(PARAMETER_OPEN))
    if param is None:
      raise _Fail("malformed_tool_call", f'expected {PARAMETER_OPEN} name="…" string="true|false">', pos)
    end = text.find(PARAMETER_CLOSE, param.end())
    if end == -1:
      raise _Fail("malformed_tool_call", f"parameter {param.group(1)!r} has no {PARAMETER_CLOSE}", pos)
    key = param.group(1)
    if key in arguments:
      raise _Fail("duplicate_parameter", f"parameter {key!r} appears twice in call of {name!r}", pos)
    arguments[key] = _parse_value(text[param.end():end], param.group(2), param.end())
    pos = end + len(PARAMETER_CLOSE)
  try:
    return ToolCall(name, arguments), pos
  except (TypeError, ValueError) as e:
    raise _Fail("malformed_tool_call", str(e), pos)


def _parse_tool_calls(text: str, pos: int, tool_names: Optional[Collection[str]]) -> tuple[ToolCall, ...]:
  """Calls in `text[pos:]`, which follows `\\n\\n<｜DSML｜function_calls>`; nothing but blanks may follow."""
  close = text.find(FUNCTION_CALLS_CLOSE, pos)
  if close == -1:
    raise _Fail("unclosed_tool_calls", f"no {FUNCTION_CALLS_CLOSE} after the call block", pos)
  calls = []
  while True:
    pos = _skip_ws(text, pos)
    if pos == close:
      break
    if not text.startswith(INVOKE_OPEN, pos) or pos > close:
      raise _Fail("malformed_tool_call", f"expected {INVOKE_OPEN} or {FUNCTION_CALLS_CLOSE}", pos)
    call, pos = _parse_invoke(text, pos, tool_names)
    calls.append(call)
  tail = close + len(FUNCTION_CALLS_CLOSE)
  if text[tail:].strip():
    raise _Fail("text_after_tool_calls", f"unexpected text after the call block: {text[tail:][:80]!r}", tail)
  return tuple(calls)


def _check_clean(field: str, value: str, offset: int) -> None:
  for special in SPECIAL_STRINGS:
    at = value.find(special)
    if at != -1:
      raise _Fail("special_token_in_text", f"{field} contains the special string {special!r}", offset + at)


def parse_completion(text: str, mode: str = "thinking",
                     tool_names: Optional[Collection[str]] = None) -> Union[Assistant, ParseError]:
  """Read what the model wrote after a generation prefix (`<think>` in thinking mode, `</think>` in chat).

  `text` may or may not end with `<｜end▁of▁sentence｜>`. With `tool_names`, a call to any other tool is an
  `unknown_tool` error.
  """
  if mode not in MODES:
    return ParseError("bad_mode", f"mode={mode!r}; allowed: {MODES}", 0)
  try:
    reasoning, pos = "", 0
    if mode == "thinking":
      end = text.find(THINK_END)
      if end == -1:
        raise _Fail("unclosed_thinking", f"no {THINK_END} closes the reasoning", len(text))
      reasoning, pos = text[:end], end + len(THINK_END)
      _check_clean("reasoning", reasoning, 0)
    body_end = len(text) - len(EOS) if text.endswith(EOS) else len(text)
    body = text[:body_end]
    start = body.find(TOOL_CALLS_START, pos)
    content = body[pos:] if start == -1 else body[pos:start]
    _check_clean("content", content, pos)
    calls = () if start == -1 else _parse_tool_calls(body, start + len(TOOL_CALLS_START), tool_names)
    return Assistant(content=content, reasoning=reasoning, tool_calls=calls)
  except _Fail as failure:
    return failure.error
