"""Tool registry: argument validation with clear errors, timeouts, failures reported as results."""

import threading

import pytest

from dsa_jax.agent.chat_format import ToolCall
from dsa_jax.agent.tools import Tool, ToolOutcome, ToolRegistry, validate

SCHEMA = {"type": "object", "required": ["city"], "additionalProperties": False, "properties": {
    "city": {"type": "string"}, "days": {"type": "integer"},
    "unit": {"type": "string", "enum": ["C", "F"]}, "tags": {"type": "array", "items": {"type": "string"}}}}


def forecast(city, days=1, unit="C", tags=()):
  return {"city": city, "days": days, "unit": unit}


@pytest.fixture
def registry():
  release = threading.Event()
  return ToolRegistry((
      Tool("forecast", "Weather.", SCHEMA, forecast),
      Tool("hang", "Never returns in time.", {"type": "object"}, lambda: release.wait(5), timeout_s=0.05),
      Tool("boom", "Raises.", {"type": "object"}, lambda: 1 / 0),
      Tool("opaque", "Returns a non-JSON value.", {"type": "object"}, lambda: object()),
  ))


def test_valid_call_returns_json(registry):
  outcome = registry.call(ToolCall("forecast", {"city": "Oslo", "days": 3}))
  assert outcome.ok and outcome.content == '{"city": "Oslo", "days": 3, "unit": "C"}'


@pytest.mark.parametrize("arguments, message", [
    ({}, "forecast.city is required but missing"),
    ({"city": 3}, "forecast.city=3 has type int; allowed types: ['string']"),
    ({"city": "x", "days": True}, "forecast.days=True has type bool; allowed types: ['integer']"),
    ({"city": "x", "unit": "K"}, "forecast.unit='K' is not one of the allowed values ['C', 'F']"),
    ({"city": "x", "tags": ["a", 1]}, "forecast.tags[1]=1 has type int"),
    ({"city": "x", "wind": 1}, "forecast.wind is not an allowed argument; allowed: ['city', 'days', 'tags', 'unit']"),
])
def test_invalid_arguments_name_field_value_and_allowed(registry, arguments, message):
  outcome = registry.call(ToolCall("forecast", arguments))
  assert not outcome.ok and message in outcome.content


def test_unknown_tool(registry):
  outcome = registry.call(ToolCall("rm", {}))
  assert not outcome.ok and "tool 'rm' is not registered; allowed: ['forecast'" in outcome.content


def test_timeout_exception_and_non_json_become_results(registry):
  assert registry.call(ToolCall("hang")).content == "error: hang timed out after 0.05 s"
  assert registry.call(ToolCall("boom")).content == "error: boom raised ZeroDivisionError: division by zero"
  assert "not JSON" in registry.call(ToolCall("opaque")).content


def test_schemas_and_registration_errors(registry):
  assert registry.names == ("forecast", "hang", "boom", "opaque")
  assert registry.schemas()[0] == {"name": "forecast", "description": "Weather.", "parameters": SCHEMA}
  with pytest.raises(ValueError, match="already registered"):
    registry.register(Tool("boom", "", {"type": "object"}, print))
  with pytest.raises(ValueError, match="Tool.parameters of 'x' must have type 'object', got 'string'"):
    Tool("x", "", {"type": "string"}, print)
  with pytest.raises(ValueError, match="timeout_s"):
    Tool("x", "", {"type": "object"}, print, timeout_s=0)


def test_validate_number_accepts_int_and_float():
  assert validate(1.5, {"type": "number"}, "v") == []
  assert validate(2, {"type": ["number", "null"]}, "v") == []
  assert validate(None, {"type": ["number", "null"]}, "v") == []


@pytest.mark.parametrize("error, shown", [(SystemExit(3), "SystemExit: 3"), (KeyboardInterrupt(), "KeyboardInterrupt")])
def test_system_exit_and_keyboard_interrupt_are_failed_calls(error, shown):
  def quit_():
    raise error
  outcome = ToolRegistry((Tool("quit", "Exits.", {"type": "object"}, quit_),)).call(ToolCall("quit"))
  assert not outcome.ok and outcome.content == f"error: quit raised {shown}"


def test_long_output_is_truncated_with_a_marker():
  registry = ToolRegistry((Tool("big", "Much text.", {"type": "object"}, lambda: "x" * 1000),),
                          max_output_chars=100)
  outcome = registry.call(ToolCall("big"))
  assert outcome.ok and outcome.content == "x" * 100 + "\n[truncated: 900 of 1000 characters cut]"
  assert ToolRegistry((Tool("big", "", {"type": "object"}, lambda: "x" * 1000),)).call(ToolCall("big")).content == (
      "x" * 1000)  # the default limit is larger
  with pytest.raises(ValueError, match=r"ToolRegistry.max_output_chars=0 is invalid; allowed: an integer >= 1"):
    ToolRegistry(max_output_chars=0)


def test_timed_out_calls_hold_at_most_max_workers_threads():
  release = threading.Event()
  registry = ToolRegistry((Tool("hang", "Waits.", {"type": "object"}, lambda: release.wait(30) and "late",
                                timeout_s=0.05),
                           Tool("echo", "Echoes.", {"type": "object"}, lambda: "ok", timeout_s=0.05)), max_workers=2)
  before = threading.active_count()
  outcomes = [registry.call(ToolCall("hang")) for _ in range(5)]
  assert threading.active_count() - before <= 2
  assert [o.content for o in outcomes[:2]] == ["error: hang timed out after 0.05 s"] * 2
  assert all(o.content == "error: hang did not start: all 2 tool workers are still running timed-out calls"
             for o in outcomes[2:])
  assert not registry.call(ToolCall("echo")).ok
  release.set()
  for _ in range(100):
    if threading.active_count() <= before:
      break
    threading.Event().wait(0.01)
  assert registry.call(ToolCall("echo")) == ToolOutcome(True, "ok")
  with pytest.raises(ValueError, match=r"ToolRegistry.max_workers=0 is invalid; allowed: an integer >= 1"):
    ToolRegistry(max_workers=0)
