"""A registry of Python tools with JSON-schema'd arguments, for DeepSeek-V3.2 tool use (spec §4).

Each tool's schema is what the system prompt lists (`chat_format.render_tools`, the `<functions>` block of
`encoding_dsv32.py`). Arguments are checked against a small JSON-Schema subset (`type`, `enum`,
`properties`, `required`, `additionalProperties`, `items`) before the call, with errors that name the
argument, the value and what was allowed. Every call runs under a timeout; a failure of any kind (an
exception, `SystemExit` and `KeyboardInterrupt` included) becomes the text of the tool result, so the model
sees it and the rollout goes on. Results longer than `max_output_chars` are cut, with a marker saying so.

Calls run on daemon threads, at most `max_workers` per registry. Python cannot stop a thread, so a call that
times out keeps its worker until the tool returns; while every worker is held, a new call waits up to its
timeout for one and then fails ("did not start") instead of starting another thread. Threads were chosen
over subprocesses because tools are closures over the caller's state (a subprocess would need them
picklable, and forking a process that runs JAX is unsafe); a tool that may hang on a resource for good
should run that work in a subprocess of its own.
"""

from __future__ import annotations

import dataclasses
import threading
from typing import Any, Callable, Mapping

from dsa_jax.agent.chat_format import ToolCall, to_json

_JSON_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "array": (list, tuple), "object": (dict,), "null": (type(None),),
}


def _matches_type(value: Any, type_name: str) -> bool:
  if type_name in ("integer", "number") and isinstance(value, bool):
    return False  # bool is an int in Python, not in JSON.
  return isinstance(value, _JSON_TYPES[type_name])


def validate(value: Any, schema: Mapping[str, Any], path: str) -> list[str]:
  """Messages for every way `value` breaks `schema` (empty when it conforms); `path` names the value."""
  errors = []
  expected = schema.get("type")
  if expected is not None:
    allowed = [expected] if isinstance(expected, str) else list(expected)
    if not any(_matches_type(value, t) for t in allowed):
      return [f"{path}={value!r} has type {type(value).__name__}; allowed types: {allowed}"]
  if "enum" in schema and value not in schema["enum"]:
    errors.append(f"{path}={value!r} is not one of the allowed values {list(schema['enum'])}")
  if isinstance(value, dict):
    properties = schema.get("properties", {})
    for name in schema.get("required", ()):
      if name not in value:
        errors.append(f"{path}.{name} is required but missing")
    for name, item in value.items():
      if name in properties:
        errors.extend(validate(item, properties[name], f"{path}.{name}"))
      elif schema.get("additionalProperties", True) is False:
        errors.append(f"{path}.{name} is not an allowed argument; allowed: {sorted(properties)}")
  if isinstance(value, (list, tuple)) and "items" in schema:
    for i, item in enumerate(value):
      errors.extend(validate(item, schema["items"], f"{path}[{i}]"))
  return errors


@dataclasses.dataclass(frozen=True)
class Tool:
  """A callable taking keyword arguments described by `parameters` (a JSON schema of type object)."""

  name: str
  description: str
  parameters: Mapping[str, Any]
  fn: Callable[..., Any]
  timeout_s: float = 10.0

  def __post_init__(self):
    if not self.name or '"' in self.name:
      raise ValueError(f"Tool.name must be non-empty and free of '\"', got {self.name!r}")
    if self.parameters.get("type") != "object":
      raise ValueError(f"Tool.parameters of {self.name!r} must have type 'object', "
                       f"got {self.parameters.get('type')!r}")
    if not self.timeout_s > 0:
      raise ValueError(f"Tool.timeout_s of {self.name!r} must be > 0, got {self.timeout_s}")

  @property
  def schema(self) -> dict[str, Any]:
    return {"name": self.name, "description": self.description, "parameters": dict(self.parameters)}


@dataclasses.dataclass(frozen=True)
class ToolOutcome:
  """`content` is what goes back to the model as the tool result; `ok` is False for any failure."""

  ok: bool
  content: str


def _run_with_timeout(fn: Callable[..., Any], kwargs: Mapping[str, Any], timeout_s: float,
                      workers: threading.BoundedSemaphore):
  """(finished, value, exception) of `fn(**kwargs)` on a daemon thread holding one of `workers` until `fn`
  returns; a call that overruns is abandoned there (module docstring)."""
  box: dict[str, Any] = {}

  def target():
    try:
      box["value"] = fn(**kwargs)
    except BaseException as e:  # SystemExit and KeyboardInterrupt too: reported to the model, not raised
      box["error"] = e
    finally:
      workers.release()

  thread = threading.Thread(target=target, daemon=True)
  thread.start()
  thread.join(timeout_s)
  if thread.is_alive():
    return False, None, None
  return True, box.get("value"), box.get("error")


class ToolRegistry:
  """Tools by name; `schemas` go into the system prompt, `call` runs a parsed `ToolCall`.

  `max_output_chars`: longer results are cut to this many characters plus a marker. `max_workers`: threads
  that may run (or hang in) tool calls at once (module docstring).
  """

  def __init__(self, tools: tuple[Tool, ...] = (), max_output_chars: int = 16384, max_workers: int = 4):
    for name, value in (("max_output_chars", max_output_chars), ("max_workers", max_workers)):
      if not (isinstance(value, int) and value >= 1):
        raise ValueError(f"ToolRegistry.{name}={value!r} is invalid; allowed: an integer >= 1.")
    self.max_output_chars, self.max_workers = max_output_chars, max_workers
    self._workers = threading.BoundedSemaphore(max_workers)
    self._tools: dict[str, Tool] = {}
    for tool in tools:
      self.register(tool)

  def register(self, tool: Tool) -> None:
    if tool.name in self._tools:
      raise ValueError(f"a tool named {tool.name!r} is already registered")
    self._tools[tool.name] = tool

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(self._tools)

  def schemas(self) -> tuple[dict[str, Any], ...]:
    return tuple(t.schema for t in self._tools.values())

  def check(self, call: ToolCall) -> list[str]:
    """Why `call` cannot run (unknown tool, invalid arguments); empty when it can."""
    if call.name not in self._tools:
      return [f"tool {call.name!r} is not registered; allowed: {list(self._tools)}"]
    return validate(dict(call.arguments), self._tools[call.name].parameters, call.name)

  def call(self, call: ToolCall) -> ToolOutcome:
    outcome = self._call(call)
    n = len(outcome.content)
    if n <= self.max_output_chars:
      return outcome
    kept = outcome.content[:self.max_output_chars]
    return ToolOutcome(outcome.ok, f"{kept}\n[truncated: {n - self.max_output_chars} of {n} characters cut]")

  def _call(self, call: ToolCall) -> ToolOutcome:
    errors = self.check(call)
    if errors:
      return ToolOutcome(False, "error: " + "; ".join(errors))
    tool = self._tools[call.name]
    if not self._workers.acquire(timeout=tool.timeout_s):
      return ToolOutcome(False, f"error: {call.name} did not start: all {self.max_workers} tool workers are still "
                                "running timed-out calls")
    finished, value, error = _run_with_timeout(tool.fn, call.arguments, tool.timeout_s, self._workers)
    if not finished:
      return ToolOutcome(False, f"error: {call.name} timed out after {tool.timeout_s} s")
    if error is not None:
      detail = f": {error}" if str(error) else ""
      return ToolOutcome(False, f"error: {call.name} raised {type(error).__name__}{detail}")
    if isinstance(value, str):
      return ToolOutcome(True, value)
    try:
      return ToolOutcome(True, to_json(value))
    except (TypeError, ValueError) as e:
      return ToolOutcome(False, f"error: {call.name} returned a value that is not JSON: {e}")
