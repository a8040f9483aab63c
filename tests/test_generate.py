"""`tnlora generate` / `chat`: a tiny Llama memorises a few replies and says them back."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import _tiny_configs, make_tokenizer, write_recipe
from typer.testing import CliRunner

from tnlora_cli.cli import app
from tnlora_cli.generation.generator import SamplingSettings, load_generator
from tnlora_cli.recipe.load import validate_recipe
from tnlora_cli.train import train

PAIRS = [
    ("what is the cat", "the cat sat on the mat"),
    ("what is the dog", "the dog ran fast"),
    ("who is the team", "the team win the game"),
    ("when do you play", "you like to play ball"),
    ("where is the sun", "the sun is a star"),
    ("how do you code", "you write python code"),
]


@pytest.fixture(scope="module")
def memorised(tmp_path_factory) -> Path:
    """A LoRA run on a tiny Llama that has learnt PAIRS by heart (held-out set = PAIRS).

    The tiny model is initialised wide (std 0.5): with the default 0.02, the frozen tied
    embeddings keep every logit near zero and no adapter can make a reply certain."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("memorised")
    tokenizer = make_tokenizer()
    config = _tiny_configs(len(tokenizer))["llama"]
    config.initializer_range = 0.5
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "llama")
    tokenizer.save_pretrained(root / "llama")
    data = root / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS))
    raw = {
        "model": str(root / "llama"),
        "task": "instruction",
        "adapter": {"type": "lora", "target_modules": "all-linear", "r": 8, "alpha": 16},
        "data": {"train": str(data), "eval": str(data), "max_length": 32},
        "training": {"max_steps": 40, "batch_size": 6, "learning_rate": 3e-2, "log_every": 20, "seed": 0},
        "output_dir": str(root / "run"),
    }
    train(validate_recipe(raw))
    shutil.copy(root / "run/eval.json", root / "train_eval.json")  # as training wrote it (tests below rewrite eval.json)
    return root / "run"


def _prompts(gen) -> list[list[int]]:
    return [gen.encode(gen.format([{"role": "user", "content": p}])) for p, _ in PAIRS]


REPLIES = [r for _, r in PAIRS]


def test_generate_returns_the_learnt_replies(memorised):
    gen = load_generator(memorised)
    assert gen.mode == "merged in memory"
    settings = SamplingSettings(max_new_tokens=12, batch_size=4)  # 6 prompts: a full and a partial batch
    base = gen.generate(_prompts(gen), settings, adapters=False)
    tuned = gen.generate(_prompts(gen), settings)
    assert gen.merged and gen.merge_max_diff < 1e-3
    assert tuned == REPLIES
    assert not any(b == r for b, r in zip(base, REPLIES))
    with pytest.raises(RuntimeError):  # the base cannot come back once merged
        gen.generate(_prompts(gen), settings, adapters=False)


def test_adapter_path_equals_merged_and_the_merged_directory(memorised, tmp_path):
    """Greedy text: adapter path (--no-merge) == merged in memory == `tnlora merge` output
    loaded by plain transformers and generating one unpadded prompt at a time."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tnlora_cli.merge import merge_run

    settings = SamplingSettings(max_new_tokens=12, batch_size=3)
    adapter_path = load_generator(memorised, merge=False)
    assert adapter_path.mode.startswith("adapter path")
    unmerged = adapter_path.generate(_prompts(adapter_path), settings)
    assert not adapter_path.merged
    merge_run(memorised, tmp_path / "merged")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "merged")
    plain = []
    for ids in _prompts(adapter_path):
        out = model.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id, pad_token_id=0)
        plain.append(tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True).strip())
    assert unmerged == plain == REPLIES
    # The merged directory is itself a valid RUN for generate.
    assert load_generator(tmp_path / "merged").generate(_prompts(adapter_path), settings) == REPLIES


def test_stream_hands_out_text_as_it_is_generated(memorised):
    gen = load_generator(memorised)
    chunks: list[str] = []
    text = gen.stream(_prompts(gen)[0], SamplingSettings(max_new_tokens=12), chunks.append)
    assert text == REPLIES[0]
    assert len(chunks) > 1 and "".join(chunks).strip() == REPLIES[0]


def test_sampling_is_deterministic_with_a_seed(memorised):
    gen = load_generator(memorised, merge=False)
    settings = SamplingSettings(max_new_tokens=6, temperature=5.0, top_p=0.95, seed=3, batch_size=6)
    first = gen.generate(_prompts(gen), settings)
    assert gen.generate(_prompts(gen), settings) == first
    assert first != REPLIES  # at temperature 5 the samples leave the memorised replies


def test_cli_prompt_streams_the_reply(memorised, tmp_path):
    out = tmp_path / "one.jsonl"
    result = CliRunner().invoke(app, ["generate", str(memorised), "--prompt", "what is the dog", "--max-new-tokens", "12", "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "the dog ran fast" in result.stdout
    assert json.loads(out.read_text()) == {"prompt": "what is the dog", "completion": "the dog ran fast"}


def test_cli_file_base_and_compare(memorised, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "reference": r}) + "\n" for p, r in PAIRS))
    out = tmp_path / "out.jsonl"
    runner = CliRunner()
    result = runner.invoke(app, ["generate", str(memorised), "--input", str(prompts), "--output", str(out), "--max-new-tokens", "12", "--batch-size", "4"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["prompt"] for r in rows] == [p for p, _ in PAIRS]  # input order, whatever the batching
    assert [r["completion"] for r in rows] == [r["reference"] for r in rows] == REPLIES

    result = runner.invoke(app, ["generate", str(memorised), "--input", str(prompts), "--output", str(out), "--max-new-tokens", "12", "--base", "--force"])
    assert result.exit_code == 0, result.output
    base = [json.loads(line)["completion"] for line in out.read_text().splitlines()]
    assert not any(b == r for b, r in zip(base, REPLIES))

    result = runner.invoke(app, ["generate", str(memorised), "--input", str(prompts), "--output", str(out), "--max-new-tokens", "12", "--compare", "--force"])
    assert result.exit_code == 0, result.output
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["base_completion"] for r in rows] == base and [r["completion"] for r in rows] == REPLIES
    assert "base vs tuned" in result.stdout and all(w in result.stdout for w in ("cat", "sat", "mat", "python"))


def test_chat_over_standard_input(memorised):
    lines = "what is the cat\n/reset\nwhere is the sun\n/exit\nhow do you code\n"
    result = CliRunner().invoke(app, ["chat", str(memorised), "--max-new-tokens", "12"], input=lines)
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "assistant: the cat sat on the mat\n(conversation reset)\nassistant: the sun is a star\n" in out
    assert "you write python code" not in out and out.count("assistant: ") == 2  # nothing after /exit


def test_chat_conversation_grows_turn_by_turn(memorised):
    from tnlora_cli.generate import chat_session

    gen = load_generator(memorised)
    seen: list[list[int]] = []
    stream = gen.stream
    gen.stream = lambda ids, *a, **k: (seen.append(ids), stream(ids, *a, **k))[1]
    messages = chat_session(gen, SamplingSettings(max_new_tokens=12), iter(["what is the cat", "what is the dog"]), lambda _: None, system="you like music")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant"]
    # The second prompt is the whole conversation so far, rendered by the chat template.
    assert seen[1] == gen.encode(gen.tokenizer.apply_chat_template(messages[:4], add_generation_prompt=True, tokenize=False))
    assert gen.tokenizer.decode(seen[1]).count("music") == 1 and len(seen[1]) > len(seen[0])


@pytest.fixture
def classification_run(tiny_models, tmp_path) -> Path:
    """A run directory of a classification recipe (generate refuses it before loading anything)."""
    run = tmp_path / "cls"
    (run / "adapter").mkdir(parents=True)
    (run / "adapter/adapter_config.json").write_text(json.dumps({"format": "tnlora-adapter"}))
    write_recipe(run / "recipe.yaml", {
        "model": str(tiny_models["bert"]), "task": "classification", "adapter": {"type": "lora", "target_modules": ["query"]},
        "data": {"train": "x.jsonl", "label_column": "label"},
    })
    return run


@pytest.mark.parametrize(
    "case, message",
    [
        ("empty file", "has no rows"),
        ("no prompt field", "line 2 has no 'prompt'"),
        ("max-new-tokens 0", "--max-new-tokens is 0"),
        ("negative temperature", "--temperature is -0.5"),
        ("classification run", "is a classification run"),
    ],
)
def test_bad_input_is_one_message_exit_2_nothing_written(memorised, classification_run, tmp_path, case, message):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text({"empty file": "\n", "no prompt field": '{"prompt": "what is the cat"}\n{"question": "what"}\n'}.get(case, '{"prompt": "what is the cat"}\n'))
    out = tmp_path / "out.jsonl"
    run = classification_run if case == "classification run" else memorised
    args = ["generate", str(run), "--input", str(prompts), "--output", str(out)]
    args += {"max-new-tokens 0": ["--max-new-tokens", "0"], "negative temperature": ["--temperature", "-0.5"]}.get(case, [])
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())  # rich wraps long lines
    assert message in text and text.count("error:") == 1
    assert "Traceback" not in result.output and not out.exists()
    assert not any(p.name.startswith(".out.jsonl") for p in tmp_path.iterdir())


def test_eval_generate_exact_match_rises_from_base_to_tuned(memorised):
    (memorised / "eval.json").write_text(json.dumps({"task": "instruction", "metrics": {"kept": 1}}))
    result = CliRunner().invoke(app, ["eval", str(memorised), "--generate", "--max-new-tokens", "12", "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    base, tuned = report["metrics"]["base"], report["metrics"]["tuned"]
    assert base["exact_match"] == 0.0 and tuned["exact_match"] == 1.0
    assert tuned["bleu"] == pytest.approx(100.0) and tuned["chrf"] == pytest.approx(100.0) and tuned["rouge_l"] == pytest.approx(1.0)
    assert base["bleu"] < 50 and base["rouge_l"] < tuned["rouge_l"] and tuned["loss"] < base["loss"]
    assert "answer_accuracy" not in tuned  # no reference holds a number
    rows = [json.loads(line) for line in (memorised / "generations.jsonl").read_text().splitlines()]
    assert sorted(r["reference"] for r in rows) == sorted(REPLIES) and all(r["tuned"] == r["reference"] for r in rows)
    saved = json.loads((memorised / "eval.json").read_text())
    assert saved["metrics"] == {"kept": 1} and saved["generate"]["metrics"]["tuned"]["exact_match"] == 1.0


def test_eval_generate_reuses_training_losses_only_for_the_same_adapter_and_rows(memorised, tmp_path):
    from tnlora_cli.evaluate import evaluate_generation
    from tnlora_cli.evaluation.metrics import held_out_digest
    from tnlora_cli.run.checkpoint import adapter_digest

    run = tmp_path / "run"
    shutil.copytree(memorised, run)
    trained = json.loads((memorised.parent / "train_eval.json").read_text())
    assert trained["adapter_sha256"] == adapter_digest(run / "adapter")
    assert trained["held_out_sha256"] == held_out_digest(load_generator(run, data=True).run.prepared.data.eval)
    marked = {**trained, "metrics": {"base": {"loss": 123.0, "perplexity": 1.0}, "tuned": {"loss": 0.5, "perplexity": 2.0}}}
    (run / "eval.json").write_text(json.dumps(marked))
    reused = evaluate_generation(run, max_new_tokens=2)["metrics"]
    assert reused["base"]["loss"] == 123.0 and reused["tuned"]["perplexity"] == 2.0
    for stale in ("adapter_sha256", "held_out_sha256"):
        (run / "eval.json").write_text(json.dumps({**marked, stale: "0" * 64}))
        computed = evaluate_generation(run, max_new_tokens=2)["metrics"]
        assert computed["base"]["loss"] == pytest.approx(trained["metrics"]["base"]["loss"], rel=1e-5)
        assert computed["tuned"]["loss"] == pytest.approx(trained["metrics"]["tuned"]["loss"], rel=1e-4, abs=1e-6)


def test_generation_metrics():
    from tnlora_cli.evaluation.text import extract_answer, normalize, score_generations

    assert normalize("  The Cat\n sat.  ") == "the cat sat"
    pattern = r"(-?[\d,]*\.?\d+)"
    assert extract_answer("3 apples, so the answer is 1,234.", pattern) == "1234"
    assert extract_answer("no number", pattern) is None
    assert extract_answer("The answer is: 7 (not 8)", r"answer is:? *(\d+)") == "7"
    scores = score_generations(["The cat sat.", "so it is 42", "x"], ["the cat sat", "the answer is 42", "4"], pattern)
    assert scores["exact_match"] == pytest.approx(1 / 3)
    assert scores["answer_accuracy"] == pytest.approx(1 / 2)  # two references hold a number
    assert 0 < scores["bleu"] < 100 and 0 < scores["chrf"] < 100 and 0 < scores["rouge_l"] < 1


def test_harness_runs_a_local_task_offline(memorised, tmp_path):
    pytest.importorskip("lm_eval")
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "response": r}) + "\n" for p, r in PAIRS))
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "tnlora_pairs.yaml").write_text(
        "task: tnlora_pairs\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: generate_until\n"
        "doc_to_text: '{{prompt}}'\n"
        "doc_to_target: '{{response}}'\n"
        "generation_kwargs:\n  until: ['<eos>']\n  max_gen_toks: 12\n  do_sample: false\n"
        "metric_list:\n  - metric: exact_match\n    ignore_case: true\n"
    )
    args = ["eval", str(memorised), "--harness", "tnlora_pairs", "--harness-include", str(tasks), "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout[result.stdout.index("{"):])
    assert report["results"]["tnlora_pairs"]["exact_match"] == 1.0  # the memorised replies, through the harness
    saved = json.loads((memorised / "harness.json").read_text())
    assert saved["results"]["tnlora_pairs"]["exact_match,none"] == 1.0 and saved["tnlora"]["tuned_model"] == "merged in memory"
    bad = CliRunner().invoke(app, ["eval", str(memorised), "--harness", "no_such_task", "--harness-include", str(tasks)])
    assert bad.exit_code == 2 and "unknown task" in " ".join(bad.output.split())


def test_fused_slices_merge_in_memory_like_the_adapter_path(make_recipe, tiny_models):
    """GPT-2 with only the q and v slices of c_attn adapted: the in-memory merge (one fused
    layer, two slices) gives the adapter path's greedy text."""
    raw = make_recipe("gpt2", "instruction", target_modules=["c_attn.q", "c_attn.v"])
    raw["training"].update(max_steps=3, learning_rate=1e-1)
    result = train(validate_recipe(raw))
    settings = SamplingSettings(max_new_tokens=8, batch_size=2)
    adapter_path = load_generator(result.output_dir, merge=False)
    merged = load_generator(result.output_dir)
    prompts = _prompts(adapter_path)[:2]
    assert merged.generate(prompts, settings) == adapter_path.generate(prompts, settings)
    assert merged.merged and merged.merge_max_diff < 1e-4


def test_output_is_checked_before_loading_and_replaced_only_with_force(memorised, tmp_path, monkeypatch):
    from tnlora_cli.generation import generator

    out = tmp_path / "out.jsonl"
    out.write_text("earlier results\n")
    args = ["generate", str(memorised), "--prompt", "what is the dog", "--max-new-tokens", "12", "--output", str(out)]
    loads = []
    original = generator.load_generator
    monkeypatch.setattr(generator, "load_generator", lambda *a, **k: (loads.append(a), original(*a, **k))[1])
    refused = CliRunner().invoke(app, args)
    flat = " ".join(refused.output.split())
    assert refused.exit_code == 2 and f"--output {out} already exists" in flat and "pass --force to replace it" in flat
    assert not loads and out.read_text() == "earlier results\n"  # refused before the model was loaded
    replaced = CliRunner().invoke(app, [*args, "--force"])
    assert replaced.exit_code == 0, replaced.output
    assert loads and json.loads(out.read_text())["completion"] == "the dog ran fast"


def test_every_phase_is_reported_in_a_log(memorised, tmp_path, monkeypatch):
    """Written to a file (plain lines): loading, the merge and its check, each pass, and for
    eval --generate the held-out losses, each with its end."""
    monkeypatch.setenv("TNLORA_PROGRESS", "plain")
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p, _ in PAIRS))
    result = CliRunner().invoke(app, ["generate", str(memorised), "--input", str(prompts), "--compare", "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    log = " ".join(result.output.split())
    for phase in (r"loading .*run: the tokenizer, the base model .* and the adapter", "generating \\(base\\) finished at step 6/6",
                  "merging the adapters into the weights in memory and checking", "generating \\(tuned\\) finished at step 6/6"):
        assert re.search(phase, log), (phase, result.output)
    assert log.index("generating (base) finished") < log.index("merging the adapters") < log.index("generating (tuned) finished")

    run = tmp_path / "run"
    shutil.copytree(memorised, run)
    (run / "eval.json").unlink()  # no training losses to reuse: they are computed, with progress
    result = CliRunner().invoke(app, ["eval", str(run), "--generate", "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    log = " ".join(result.output.split())
    for phase in ("held-out loss of base and tuned \\(6 examples each\\) finished at step 12/12", "generating \\(base\\) finished at step 6/6",
                  "merging the adapters", "generating \\(tuned\\) finished at step 6/6"):
        assert re.search(phase, log), (phase, result.output)


def test_a_conversation_past_the_positions_drops_the_turn_and_goes_on(memorised):
    long_turn = " ".join(["cat"] * 120)
    lines = f"{long_turn}\n/reset\nwhat is the cat\n"
    result = CliRunner().invoke(app, ["chat", str(memorised), "--max-new-tokens", "12"], input=lines)
    assert result.exit_code == 0, result.output
    flat = " ".join(result.stdout.split())
    assert re.search(r"the conversation: \d+ prompt tokens \+ --max-new-tokens 12 = \d+ exceed the 128 positions .* /reset starts over", flat)
    assert "assistant: the cat sat on the mat" in result.stdout and result.stdout.count("assistant: ") == 1


@pytest.mark.parametrize("command", ["generate", "eval --generate"])
def test_an_interruption_names_the_phase_exits_130_and_writes_nothing(memorised, tmp_path, monkeypatch, command):
    """Ctrl-C (KeyboardInterrupt) in the middle of the tuned pass, after its first batch."""
    from tnlora_cli.generation.generator import Generator

    run = tmp_path / "run"
    shutil.copytree(memorised, run)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    original = Generator.generate

    def interrupted(self, prompts, settings, *, adapters=True, progress=None, where=None):
        if not adapters:
            return original(self, prompts, settings, adapters=adapters, progress=progress, where=where)
        progress(2)
        raise KeyboardInterrupt

    monkeypatch.setattr(Generator, "generate", interrupted)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p}) + "\n" for p, _ in PAIRS))
    out = tmp_path / "out.jsonl"
    if command == "generate":
        args = ["generate", str(run), "--input", str(prompts), "--output", str(out), "--compare", "--max-new-tokens", "4", "--batch-size", "2"]
    else:
        args = ["eval", str(run), "--generate", "--max-new-tokens", "4", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130, result.output
    flat = " ".join(result.output.split())
    kept = f"nothing was written to {out}" if command == "generate" else "generations.jsonl and eval.json were left as they were"
    assert f"error: {command} interrupted while generating (tuned) (2/6 done); {kept}" in flat, result.output
    assert "Traceback" not in result.output and not out.exists()
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert not [p for p in [*run.iterdir(), *tmp_path.iterdir()] if ".tmp-" in p.name]


def test_generation_needs_no_training_data(memorised, tmp_path):
    """The run's data file may be gone: generate reads none (eval --generate needs its held-out split)."""
    import yaml

    run = tmp_path / "run"
    shutil.copytree(memorised, run)
    recipe = yaml.safe_load((run / "recipe.yaml").read_text())
    recipe["data"]["train"] = recipe["data"]["eval"] = str(tmp_path / "moved-away.jsonl")
    (run / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    result = CliRunner().invoke(app, ["generate", str(run), "--prompt", "what is the dog", "--max-new-tokens", "12"])
    assert result.exit_code == 0, result.output
    assert "the dog ran fast" in result.stdout
