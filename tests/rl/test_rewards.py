"""Rule-based rewards of the verifiable digit tasks."""

import numpy as np
from absl.testing import parameterized

from dsa_jax import rl


class DigitTasksTest(parameterized.TestCase):

  @parameterized.named_parameters(
      ("sort", "sort", "40213", "01234"),
      ("reverse", "reverse", "40213", "31204"),
      # Running sums 4, 4, 6, 7, 10 -> mod 10.
      ("cumsum_mod10", "cumsum_mod10", "40213", "44670"),
  )
  def test_answers(self, name, digits, answer):
    task = rl.get_task(name, min_len=5, max_len=5)
    self.assertEqual(task.transform(digits), answer)
    self.assertEqual(task.reward(answer, answer), 1.0)

  def test_prompts_are_reproducible_and_consistent(self):
    task = rl.get_task("sort", min_len=3, max_len=6)
    pairs = [task.make_prompt(np.random.default_rng(7)) for _ in range(2)]
    self.assertEqual(pairs[0], pairs[1])
    for prompt, answer in (task.make_prompt(np.random.default_rng(s)) for s in range(20)):
      self.assertRegex(prompt, r"^sort:[0-9]{3,6}=$")
      self.assertEqual(answer, "".join(sorted(prompt[5:-1])))
      self.assertTrue(prompt.isascii())  # one byte per character in the byte-level vocabulary

  @parameterized.named_parameters(
      # reward = 0.2·format + 0.8·correct against the answer "01234".
      ("exact", "01234", 1.0),
      ("one_wrong_digit", "01294", 0.2 + 0.8 * 4 / 5),
      ("one_digit_short", "0123", 0.2 * 4 / 5 + 0.8 * 4 / 5),
      ("two_digits_long", "0123456", 0.2 * 3 / 5 + 0.8),
      ("non_digit", "01 34", 0.8 * 4 / 5),
      ("empty", "", 0.0),
      ("far_too_long", "0" * 20, 0.8 * 1 / 5),
  )
  def test_reward_examples(self, completion, expected):
    reward = rl.get_task("sort").reward(completion, "01234")
    self.assertAlmostEqual(reward, expected, places=6)
    self.assertTrue(0.0 <= reward <= 1.0)

  def test_registry_and_errors(self):
    self.assertEqual(rl.task_names(), ["cumsum_mod10", "reverse", "sort"])
    with self.assertRaisesRegex(ValueError,
                                r"name='sorting' is unknown; allowed: \['cumsum_mod10', 'reverse', 'sort'\]"):
      rl.get_task("sorting")
    with self.assertRaisesRegex(ValueError, r"'sort' is already registered"):
      rl.register_task("sort", lambda: None)
    with self.assertRaisesRegex(ValueError, r"DigitTask.max_len=2 is invalid; allowed: .*>= min_len=3"):
      rl.get_task("reverse", min_len=3, max_len=2)
    with self.assertRaisesRegex(ValueError, r"DigitTask.format_weight=1.5"):
      rl.get_task("reverse", format_weight=1.5)
