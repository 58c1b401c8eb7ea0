"""The demo teachers' task: problems, bug rules, traces, the step checker and the tokenizers.

The benchmark modules are imported from `benchmarks/demo_models` put on sys.path, the way
train.py itself imports them when run as a script.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "demo_models"))

import task  # noqa: E402
import tokenizers_and_templates as tt  # noqa: E402

EXAMPLE = task.Problem(37, (("+", 48), ("*", 3), ("-", 19)))
EXAMPLE_STEPS = (" 37 + 48 = 85\n", " 85 * 3 = 255\n", " 255 - 19 = 236\n")


def test_problem_reads_as_a_question_with_its_gold_answer():
    assert EXAMPLE.question == "Start with 37. Add 48, multiply by 3, subtract 19."
    assert task.Problem(5, (("*", 2), ("+", 3))).question == "Start with 5. Multiply by 2, add 3."
    assert EXAMPLE.gold == 236


def test_problems_are_determined_by_their_seed():
    assert task.sample_problems(50, seed=3) == task.sample_problems(50, seed=3)
    assert task.sample_problems(50, seed=3) != task.sample_problems(50, seed=4)
    assert task.sample_problems(50, seed=3, split="heldout") == task.sample_problems(
        50, seed=3, split="heldout"
    )


def test_problems_stay_in_range():
    for problem in task.sample_problems(2000, seed=1):
        assert 10 <= problem.start <= 99 and 3 <= len(problem.ops) <= 5
        value = problem.start
        for op, b in problem.ops:
            assert (2 <= b <= 9) if op == "*" else (2 <= b <= 99)
            value = task.apply(value, op, b)
            assert 0 <= value < task.LIMIT


def test_heldout_problems_never_appear_in_training():
    heldout = task.sample_problems(300, seed=0, split="heldout")
    assert len(set(heldout)) == 300
    for seed in (0, 1):
        train = task.sample_problems(3000, seed=seed)
        assert len(set(train)) == 3000
        assert not {p.question for p in train} & {p.question for p in heldout}
    assert {task.split_of(p) for p in heldout} == {"heldout"}


@pytest.mark.parametrize(
    ("rule", "a", "op", "b", "written"),
    [
        # A: (ones digit of a) * b >= 30 drops the ones column's carry
        ("a", 38, "*", 4, 122),  # 8*4 = 32: 152 - 30
        ("a", 36, "*", 5, 150),  # 6*5 = 30, the threshold: 180 - 30
        ("a", 1234, "*", 8, 9842),  # 4*8 = 32: 9872 - 30
        ("a", 37, "*", 3, None),  # 7*3 = 21
        ("a", 29, "*", 3, None),  # 9*3 = 27: never fires for * 2 or * 3
        ("a", 70, "*", 9, None),  # 0*9 = 0
        ("a", 38, "+", 4, None),
        # B: second number ending in 7 or 8 drops the ones column's carry or borrow
        ("b", 35, "+", 47, 72),  # 82 - 10
        ("b", 33, "+", 7, 30),  # 3+7 = 10, a carry: 40 - 10
        ("b", 63, "-", 28, 45),  # 35 + 10
        ("b", 31, "+", 47, None),  # 1+7 = 8: no carry
        ("b", 69, "-", 28, None),  # 9 >= 8: no borrow
        ("b", 35, "+", 46, None),
        ("b", 35, "+", 49, None),
        ("b", 35, "*", 7, None),
        # C: a borrow in the tens column does not decrement the hundreds
        ("c", 240, "-", 52, 288),  # 188 + 100
        ("c", 305, "-", 27, 378),  # the ones borrow makes the tens 0-1 < 2: 278 + 100
        ("c", 350, "-", 60, 390),  # no ones borrow, tens 5 < 6: 290 + 100
        ("c", 355, "-", 46, None),  # tens 5-1 = 4, not < 4
        ("c", 236, "-", 19, None),
        ("c", 240, "+", 52, None),
    ],
)
def test_bug_rules_fire_exactly_on_their_numbers(rule, a, op, b, written):
    assert task.BUGS[rule](a, op, b) == written
    expected = task.apply(a, op, b) if written is None else written
    assert task.written_result(a, op, b, task.BUGS[rule]) == expected


def test_bug_rules_are_visible_and_complementary():
    """Every firing writes a wrong value; A never fires with B or C on the same step, so the
    teachers together always have a right step."""
    for a in range(0, 1000, 7):
        for b in range(2, 100):
            for op in "+-*" if b < 10 else "+-":
                wrong = {name: bug(a, op, b) for name, bug in task.BUGS.items()}
                assert all(w is None or w != task.apply(a, op, b) for w in wrong.values())
                assert wrong["a"] is None or (wrong["b"] is None and wrong["c"] is None)
                assert (wrong["a"] is None) == (op != "*" or (a % 10) * b < 30)


def test_trace_renders_the_step_format_exactly():
    trace = task.render_trace(EXAMPLE)
    assert trace.steps == EXAMPLE_STEPS
    assert trace.answer == " The final answer is 236." and trace.value == 236


def test_buggy_trace_continues_from_its_wrong_value():
    problem = task.Problem(38, (("*", 4), ("+", 10)))
    trace = task.render_trace(problem, task.BUGS["a"])
    assert trace.steps == (" 38 * 4 = 122\n", " 122 + 10 = 132\n") and trace.value == 132
    check = task.check_trace(problem, trace.steps)
    assert check.valid == (False, True) and check.follows_question and not check.sound
    assert task.render_trace(problem, task.BUGS["b"]) == task.render_trace(problem)


@pytest.mark.parametrize(
    ("text", "valid"),
    [
        (" 37 + 48 = 85\n", True),
        ("37 + 48 = 85", True),
        (" 85 * 3 = 255\n", True),
        (" 5 - 7 = -2\n", True),
        (" 37 + 48 = 86\n", False),
        (" 38 * 4 = 122\n", False),
        (" 37 plus 48 = 85\n", None),
        (" 37 + 48 = \n", None),
        (" 37 / 4 = 9\n", None),
        (" 37 + 48 = 85, so\n", None),
        ("", None),
    ],
)
def test_step_checker(text, valid):
    assert task.check_step(text) is valid


@pytest.mark.parametrize(
    ("steps", "valid", "follows"),
    [
        (EXAMPLE_STEPS, (True, True, True), True),
        (EXAMPLE_STEPS[:2], (True, True), False),  # a step missing
        ((*EXAMPLE_STEPS, " 236 + 1 = 237\n"), (True, True, True, True), False),  # one too many
        ((" 37 + 48 = 85\n", " 85 * 4 = 340\n", " 340 - 19 = 321\n"), (True, True, True), False),
        ((" 37 + 48 = 85\n", " 86 * 3 = 258\n", " 258 - 19 = 239\n"), (True, True, True), False),
        ((" 37 + 48 = 85\n", " so 255\n", " 255 - 19 = 236\n"), (True, None, True), False),
    ],
    ids=["sound", "missing", "extra", "wrong-operand", "broken-chain", "unparsable"],
)
def test_trace_checker(steps, valid, follows):
    check = task.check_trace(EXAMPLE, steps)
    assert check.valid == valid and check.follows_question is follows
    assert check.sound is (follows and all(v is True for v in valid))


def test_answer_reader():
    assert task.read_answer(" The final answer is 236.") == 236
    assert task.read_answer(" The final answer is -4") == -4
    assert task.read_answer(" The answer is 236.") is None


def conversation(tokenizer, problem: task.Problem) -> tuple[str, list[int]]:
    """The whole exchange, and where cordgen cuts it (after each `### Step k.`, before each
    marker and `</think>`, inside the scorer's `... answer is| 236`)."""
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": problem.question}], tokenize=False, add_generation_prompt=True
    )
    text, cuts = prompt if prompt.endswith("<think>\n") else prompt + "<think>\n", []
    for k, step in enumerate(task.render_trace(problem).steps, start=1):
        text += f"### Step {k}."
        cuts.append(len(text))
        text += step
        cuts.append(len(text))
    text += "</think> The final answer is"
    cuts.append(len(text))
    return text + f" {problem.gold}." + tokenizer.eos_token, cuts


@pytest.mark.parametrize("style", sorted(tt.STYLES))
def test_tokenizers_decode_exactly_and_split_where_cordgen_cuts(style):
    tokenizer = tt.build_tokenizer(tt.STYLES[style])
    text, cuts = conversation(tokenizer, EXAMPLE)
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert tokenizer.decode(ids) == text and tokenizer.unk_token_id not in ids
    tokens = tokenizer.convert_ids_to_tokens(ids)
    assert "2" in tokens and not any(t.isdigit() and len(t) > 1 for t in tokens)  # one token per digit
    pieces = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
    assert sum((tokenizer.encode(p, add_special_tokens=False) for p in pieces), []) == ids


def test_teachers_differ_in_vocabulary_and_template():
    tokenizers = {name: tt.build_tokenizer(tt.STYLES[name]) for name in ("chatml", "tags", "inst")}
    texts = {name: conversation(tok, EXAMPLE)[0] for name, tok in tokenizers.items()}
    ids = {name: tok.encode(texts[name], add_special_tokens=False) for name, tok in tokenizers.items()}
    assert len(set(texts.values())) == 3 and len({tuple(i) for i in ids.values()}) == 3
    assert len({tok.convert_tokens_to_ids("7") for tok in tokenizers.values()}) == 3
    assert texts["tags"].count("<think>") == 1  # its generation prompt opened thinking already


def test_questions_parse_back_into_their_problem():
    for problem in task.sample_problems(300, seed=5):
        assert task.parse_question(problem.question) == problem
    assert task.parse_question("What is 2 + 2?") is None


def test_firing_rules_name_the_teachers_that_would_err():
    assert task.firing_rules(task.Problem(38, (("*", 4),))) == {"a"}
    assert task.firing_rules(task.Problem(35, (("+", 47),))) == {"b"}
    assert task.firing_rules(task.Problem(240, (("-", 52),))) == {"c"}
    assert task.firing_rules(task.Problem(63, (("-", 28), ("*", 2)))) == {"b"}
    assert task.firing_rules(EXAMPLE) == {"b"}  # 37 + 48 carries
    assert task.firing_rules(task.Problem(12, (("+", 3), ("*", 2)))) == set()


def test_a_sound_prefix_is_a_right_start_of_the_chain():
    assert task.check_trace(EXAMPLE, EXAMPLE_STEPS[:2]).sound_prefix
    assert not task.check_trace(EXAMPLE, EXAMPLE_STEPS[:2]).sound
    assert task.check_trace(EXAMPLE, ()).sound_prefix
    assert not task.check_trace(EXAMPLE, (" 37 + 48 = 75\n",)).sound_prefix
    assert not task.check_trace(EXAMPLE, (*EXAMPLE_STEPS, " 1 + 1 = 2\n")).sound_prefix


def test_the_demo_prm_starts_as_the_causal_lm_it_is_made_from():
    import torch
    from reward_model import ARCHITECTURE, from_causal_lm
    from transformers import LlamaForCausalLM

    tokenizer = tt.build_tokenizer(tt.STYLES["rewards"])
    torch.manual_seed(0)
    lm = LlamaForCausalLM(tt.model_config(tokenizer)).eval()
    prm = from_causal_lm(lm).eval()
    ids = torch.tensor([tokenizer.encode("Start with 37.<extra_0> 37 + 48 = 85<extra_0>")])
    with torch.no_grad():
        expected = lm.model(ids).last_hidden_state
        got = prm.model(ids).last_hidden_state
        assert prm(ids).logits.shape == (1, ids.shape[1], 2)
    assert torch.allclose(got, expected, atol=1e-5)
    assert prm.config.architectures == [ARCHITECTURE] and prm.config.num_labels == 2
    assert sorted({name.split(".")[0] for name in prm.state_dict()}) == ["model", "score"]


def test_the_demo_verifier_starts_as_the_prm_body_it_is_made_from(tmp_path):
    import torch
    from reward_model import from_causal_lm, to_causal_lm
    from transformers import LlamaForCausalLM

    tokenizer = tt.build_tokenizer(tt.STYLES["rewards"])
    torch.manual_seed(0)
    prm = from_causal_lm(LlamaForCausalLM(tt.model_config(tokenizer)))
    with torch.no_grad():  # a trained PRM's q/k/v biases are not zero
        for name, parameter in prm.model.named_parameters():
            if name.endswith("_proj.bias"):
                parameter.normal_()
    lm = to_causal_lm(prm, tt.model_config(tokenizer))
    lm.save_pretrained(tmp_path)  # as vLLM reads it: a Llama with attention biases
    lm = LlamaForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([tokenizer.encode("Start with 37.<extra_0> 37 + 48 = 85<extra_0>")])
    with torch.no_grad():
        expected = prm.eval().model(ids).last_hidden_state
        assert torch.allclose(lm.model(ids).last_hidden_state, expected, atol=1e-5)
    assert lm.config.attention_bias and lm.config.tie_word_embeddings


def test_prm_examples_are_rendered_as_the_prm_kind_reads_them_with_a_label_at_every_separator():
    import random
    from types import SimpleNamespace

    import train

    from cordgen.config import EngineSettings, ScorerConfig, StepFormat
    from cordgen.engines.scorers import RewardReading

    tokenizer = tt.build_tokenizer(tt.STYLES["rewards"])
    engine = SimpleNamespace(tokenizer=tokenizer, settings=EngineSettings(model="demo-prm"))
    config = ScorerConfig(engine={"model": "scorer"}, kind="prm", prm={"engine": {"model": "demo-prm"}})
    reading = RewardReading(config, engine, StepFormat())
    rewards = train.Rewards(tokenizer)
    wrong = (EXAMPLE_STEPS[0], " 85 * 3 = 245\n", " 245 - 19 = 226\n")  # step 2 wrong, step 3 carries it
    assert rewards.prompt(EXAMPLE, wrong) == reading.prompt_ids(EXAMPLE.question, wrong)
    assert rewards.separator == reading.separator
    assert train.prefix_labels(EXAMPLE, wrong) == [1, 0, 0]
    assert train.prefix_labels(EXAMPLE, EXAMPLE_STEPS) == [1, 1, 1]
    rng = random.Random(0)
    for _ in range(20):
        ids, labels = rewards.encode(EXAMPLE, rng)
        at_separators = [label for token, label in zip(ids, labels) if token == rewards.separator]
        assert at_separators and set(at_separators) <= {0, 1}
        assert sum(label != -100 for label in labels) == len(at_separators)


def test_training_the_verifier_alone_without_its_start_is_one_line(tmp_path, capsys):
    import train

    with pytest.raises(SystemExit) as stop:
        train.parse_args(["--out", str(tmp_path), "--models", "verifier"])
    assert stop.value.code == 2
    assert f"starts from {tmp_path / 'prm'}, not there" in capsys.readouterr().err
    assert train.parse_args(["--out", str(tmp_path), "--models", "prm,verifier"]).models == "prm,verifier"
