"""encode → parse recovers the message; malformed output gives a ParseError value, never an exception."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dsa_jax.agent.chat_format import Assistant, ToolCall, render_completion
from dsa_jax.agent.parse import ERROR_KINDS, ParseError, parse_completion
from dsa_jax.data.tokenizer import DEEPSEEK_V32_SPECIAL_TOKENS, ByteTokenizer

# Free text: no fullwidth bar (so no <｜…｜> token or DSML marker) and no think tags.
FREE_TEXT = st.text(alphabet=st.characters(blacklist_characters="｜", blacklist_categories=("Cs",)),
                    max_size=30).filter(lambda s: "<think>" not in s and "</think>" not in s)
NAMES = st.text(alphabet=st.characters(blacklist_characters='"｜', blacklist_categories=("Cs",)),
                min_size=1, max_size=10)
JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(),
                         st.floats(allow_nan=False, allow_infinity=False), FREE_TEXT)
JSON_VALUES = st.recursive(JSON_SCALARS, lambda inner: st.one_of(
    st.lists(inner, max_size=3), st.dictionaries(FREE_TEXT, inner, max_size=3)), max_leaves=6)
TOOL_CALLS = st.lists(st.builds(ToolCall, NAMES, st.dictionaries(NAMES, JSON_VALUES, max_size=3)), max_size=3)


@settings(max_examples=200, deadline=None)
@given(FREE_TEXT, FREE_TEXT, TOOL_CALLS, st.sampled_from(["thinking", "chat"]), st.booleans())
def test_render_then_parse_recovers_the_message(reasoning, content, calls, mode, with_eos):
  message = Assistant(content=content, reasoning=reasoning if mode == "thinking" else "",
                      tool_calls=tuple(calls))
  text = render_completion(message, mode)
  text = text if with_eos else text.removesuffix("<｜end▁of▁sentence｜>")
  assert parse_completion(text, mode) == message


@settings(max_examples=50, deadline=None)
@given(FREE_TEXT, TOOL_CALLS)
def test_round_trip_through_the_byte_tokenizer(content, calls):
  tok = ByteTokenizer()
  message = Assistant(content=content, reasoning="why", tool_calls=tuple(calls))
  assert parse_completion(tok.decode(tok.encode(render_completion(message))), "thinking") == message


def test_strings_raw_other_values_json():
  text = ('r</think>c\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n'
          '<｜DSML｜parameter name="s" string="true">[1, 2]</｜DSML｜parameter>\n'
          '<｜DSML｜parameter name="j" string="false">[1, 2]</｜DSML｜parameter>\n'
          '</｜DSML｜invoke>\n</｜DSML｜function_calls><｜end▁of▁sentence｜>')
  assert parse_completion(text) == Assistant("c", "r", (ToolCall("f", {"s": "[1, 2]", "j": [1, 2]}),))


def test_blank_variations_between_tags_are_tolerated():
  text = ('</think>\n\n<｜DSML｜function_calls>  <｜DSML｜invoke name="f" >'
          '<｜DSML｜parameter name="a" string="false">3</｜DSML｜parameter></｜DSML｜invoke>\n\n'
          '</｜DSML｜function_calls>\n')
  assert parse_completion(text) == Assistant(tool_calls=(ToolCall("f", {"a": 3}),))


CALL_HEAD = '\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke name="f">\n'
PARAM = '<｜DSML｜parameter name="a" string="false">{}</｜DSML｜parameter>\n'
CALL_TAIL = '</｜DSML｜invoke>\n</｜DSML｜function_calls>'


@pytest.mark.parametrize("text, kind", [
    ("reasoning without an end", "unclosed_thinking"),
    ("r</think>" + CALL_HEAD + PARAM.format(1), "unclosed_tool_calls"),
    ("r</think>" + CALL_HEAD + PARAM.format("{oops") + CALL_TAIL, "bad_json"),
    ("r</think>" + CALL_HEAD + PARAM.format(1) + PARAM.format(2) + CALL_TAIL, "duplicate_parameter"),
    ("r</think>" + CALL_HEAD.replace('"f"', '"rm_rf"') + CALL_TAIL, "unknown_tool"),
    ("r</think>" + CALL_HEAD + "<｜DSML｜parameter name=a>1</｜DSML｜parameter>" + CALL_TAIL,
     "malformed_tool_call"),
    ("r</think>" + CALL_HEAD + "junk" + CALL_TAIL, "malformed_tool_call"),
    ("r</think>\n\n<｜DSML｜function_calls>\n<｜DSML｜invoke>" + CALL_TAIL, "malformed_tool_call"),
    ("r</think>" + CALL_HEAD + CALL_TAIL + "more words", "text_after_tool_calls"),
    ("r</think>a<think>b</think>c", "special_token_in_text"),
    ("r</think>answer<｜end▁of▁sentence｜>and more", "special_token_in_text"),
    ("<｜User｜>r</think>c", "special_token_in_text"),
])
def test_malformed_output_gives_a_parse_error(text, kind):
  error = parse_completion(text, "thinking", tool_names=("f",))
  assert isinstance(error, ParseError)
  assert error.kind == kind, error
  assert 0 <= error.offset <= len(text)


def test_unknown_mode_is_a_parse_error():
  assert parse_completion("x", "fast").kind == "bad_mode"


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.text(max_size=8), st.sampled_from(DEEPSEEK_V32_SPECIAL_TOKENS + (
    '"', ' name="f">', ' string="false">', "\n\n", "[[[[", "{"))), max_size=14).map("".join),
    st.sampled_from(["thinking", "chat"]))
def test_no_exception_escapes(text, mode):
  result = parse_completion(text, mode, tool_names=("f",))
  assert isinstance(result, (Assistant, ParseError))
  if isinstance(result, ParseError):
    assert result.kind in ERROR_KINDS


def test_deeply_nested_json_is_a_parse_error():
  deep = "[" * 100_000
  error = parse_completion("r</think>" + CALL_HEAD + PARAM.format(deep) + CALL_TAIL)
  assert error.kind == "bad_json"
