"""The CLI: flags, config files, prompt files, one-line user errors, and an end-to-end run on a tiny model."""

import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest

from batched_specdec.config import VALID_KEYS, ConfigError, RunConfig, build_config, read_config_file
from batched_specdec.main import build_parser, main, parse_config
from batched_specdec.models import load_draft
from batched_specdec.prompts import (
    PromptFileError,
    builtin_prompts,
    encode_prompts,
    read_prompts_file,
    select_prompts,
)

FLAGS = [
    "--config",
    "--target",
    "--draft",
    "--gamma",
    "--batch-size",
    "--max-new-tokens",
    "--temperature",
    "--top-k",
    "--top-p",
    "--seed",
    "--device",
    "--dtype",
    "--num-prompts",
    "--prompts",
    "--output-dir",
    "--show-output",
    "--no-baseline",
]


def run_main_expect_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code not in (0, None)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


def test_every_flag_has_help():
    parser = build_parser()
    for action in parser._actions:
        assert action.help, action.option_strings
    text = parser.format_help()
    for flag in FLAGS:
        assert flag in text


def test_defaults():
    config = parse_config([])
    assert config == RunConfig()
    assert config.target == "embedded" and config.draft == "auto" and config.temperature == 0


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_file_and_cli_override(tmp_path, suffix):
    path = tmp_path / f"run{suffix}"
    values = {"gamma": 3, "batch-size": 2, "temperature": 0.7, "top_k": 20, "show_output": True}
    if suffix == ".json":
        path.write_text(json.dumps(values))
    else:
        path.write_text("\n".join(f"{k}: {str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()))
    config = parse_config(["--config", str(path), "--gamma", "7", "--top-p", "0.9"])
    assert config.gamma == 7  # CLI wins
    assert config.batch_size == 2 and config.temperature == 0.7 and config.top_k == 20 and config.top_p == 0.9
    assert config.show_output is True
    assert read_config_file(path)["batch_size"] == 2


def test_config_validation():
    with pytest.raises(ConfigError, match="gamma must be an int >= 1 or 'auto', got 0"):
        build_config({}, {"gamma": 0})
    with pytest.raises(ConfigError, match="gamma must be an int >= 1 or 'auto', got 'fast'"):
        build_config({"gamma": "fast"})
    with pytest.raises(ConfigError, match="--gamma-max 4 only applies with --gamma 'auto', got --gamma 3"):
        build_config({}, {"gamma": 3, "gamma_max": 4})
    with pytest.raises(ConfigError, match="--gamma-max must be an int >= 1, got 0"):
        build_config({}, {"gamma_max": 0})
    with pytest.raises(ConfigError, match=r"gamma_max \(config file 'c.yaml'\) must be an int >= 1, got 0"):
        build_config({"gamma_max": 0}, {}, "c.yaml")  # a value from a config file is named by its key and file
    assert build_config({"gamma": "4"}).gamma == 4 and build_config().gamma == "auto"
    assert build_config({"top_k": 5}).top_k == 5  # ignored by greedy decoding, with a warning (as model.generate)
    with pytest.raises(ConfigError, match="--ngram-min must be an int >= 1, got 0"):
        build_config({}, {"ngram_min": 0})
    with pytest.raises(ConfigError, match=r"--ngram-max must be >= --ngram-min \(3\), got 2"):
        build_config({}, {"ngram_min": 3, "ngram_max": 2})
    with pytest.raises(ConfigError,
                       match="apply to --draft ngram, hybrid and auto only, but the draft is 'some/model'"):
        build_config({"draft": "some/model"}, {"ngram_max": 5})
    config = build_config({"ngram_max": 5}, {"ngram_min": 2})
    drafter = load_draft(config.draft, max_ngram=config.ngram_max, min_ngram=config.ngram_min)
    assert (drafter.max_ngram, drafter.min_ngram) == (5, 2)


def test_config_file_types(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("batch_size: four\n")
    with pytest.raises(ConfigError, match="'batch_size' must be an integer"):
        read_config_file(path)
    path.write_text("show_output: 1\n")
    with pytest.raises(ConfigError, match="true or false"):
        read_config_file(path)


def test_error_unknown_config_key(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("gamma: 4\nbatchsize: 8\n")
    line = run_main_expect_error(["--config", str(path)], capsys)
    assert "batchsize" in line and "valid keys" in line
    for key in VALID_KEYS:
        assert key in line


def test_error_unreadable_config(tmp_path, capsys):
    line = run_main_expect_error(["--config", str(tmp_path / "nope.yaml")], capsys)
    assert "cannot read config file" in line
    bad = tmp_path / "bad.json"
    bad.write_text("{gamma: ")
    assert "cannot parse config file" in run_main_expect_error(["--config", str(bad)], capsys)
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("gamma: [1, 2\n")
    assert "cannot parse config file" in run_main_expect_error(["--config", str(bad_yaml)], capsys)
    listing = tmp_path / "list.yaml"
    listing.write_text("- 1\n- 2\n")
    assert "mapping" in run_main_expect_error(["--config", str(listing)], capsys)


def test_error_bad_values(capsys):
    assert "gamma must be an int >= 1 or 'auto', got 0" in run_main_expect_error(["--gamma", "0"], capsys)
    assert "gamma must be an int >= 1 or 'auto', got 'abc'" in run_main_expect_error(["--gamma", "abc"], capsys)
    assert "--batch-size must be an int >= 1, got -1" in run_main_expect_error(["--batch-size", "-1"], capsys)
    assert "--top-p must be" in run_main_expect_error(["--temperature", "1", "--top-p", "1.5"], capsys)
    assert "--device 'tpu' is not one of auto, cpu, cuda, cuda:N" in run_main_expect_error(["--device", "tpu"], capsys)
    assert "unrecognized arguments" in run_main_expect_error(["--gama", "3"], capsys)


def test_error_missing_prompts_file(tmp_path, capsys):
    line = run_main_expect_error(["--prompts", str(tmp_path / "missing.txt"), "--device", "cpu"], capsys)
    assert "missing.txt" in line and "does not exist" in line


def test_error_model_not_available_offline(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    line = run_main_expect_error(
        ["--target", "someorg/not-cached-model", "--device", "cpu", "--output-dir", str(tmp_path)], capsys
    )
    assert "not available offline" in line


def test_prompt_files(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first prompt\n\n  second prompt  \n")
    assert read_prompts_file(txt) == ["first prompt", "second prompt"]
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"prompt": "a", "id": 1}\n\n{"prompt": "b\\nc"}\n')
    assert read_prompts_file(jsonl) == ["a", "b\nc"]
    detected = tmp_path / "p.data"
    detected.write_text('{"prompt": "x"}\n')
    assert read_prompts_file(detected) == ["x"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "ok"}\n{"text": "no prompt"}\n')
    with pytest.raises(PromptFileError, match="line 2"):
        read_prompts_file(bad)
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(PromptFileError, match="no prompts"):
        read_prompts_file(empty)
    assert select_prompts(["a", "b", "c"], 2) == ["a", "b"] and select_prompts(["a", "b"], None) == ["a", "b"]
    with pytest.raises(ConfigError, match="--num-prompts 5 asks for more prompts than the prompt set holds \\(2\\)"):
        select_prompts(["a", "b"], 5)  # never cycled


def test_builtin_prompts():
    prompts = builtin_prompts()
    assert len(prompts) >= 30
    assert len(set(prompts)) == len(prompts)
    assert any("Repeat" in p for p in prompts[:8]) and any("def " in p or "Python" in p for p in prompts[:8])


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from test_models import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-cli"))


def test_encode_prompts_without_chat_template(tiny_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    assert not tokenizer.chat_template
    ids = encode_prompts(tokenizer, ["the quick fox", "hello"])
    assert [len(x) for x in ids] == [3, 1]


@pytest.mark.parametrize("draft", ["ngram", "target", "eagle3"])
def test_end_to_end_greedy(tiny_dir, tmp_path, capsys, draft):
    draft_args = {"ngram": ["ngram", "--ngram-max", "4", "--ngram-min", "2"], "target": [tiny_dir]}
    if draft == "eagle3":  # a public-layout EAGLE-3 head for the tiny target
        from eagle_checkpoints import write_eagle3
        from transformers import AutoModelForCausalLM

        head = write_eagle3(tmp_path / "eagle3", AutoModelForCausalLM.from_pretrained(tiny_dir), layer_ids=(0, 1, 1))
        draft_args["eagle3"] = [str(head)]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "the quick brown fox jumps over the lazy dog the quick brown\nhello world\n"
        "one two three one two three one two\na cat is in the\nover\n"
    )
    out_dir = tmp_path / "out"
    argv = [
        "--target",
        tiny_dir,
        "--draft",
        *draft_args[draft],
        "--prompts",
        str(prompts),
        "--num-prompts",
        "5",
        "--batch-size",
        "3",
        "--max-new-tokens",
        "12",
        "--gamma",
        "3",
        "--device",
        "cpu",
        "--output-dir",
        str(out_dir),
        "--show-output",
    ]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "tokens/s" in stdout and "speedup" in stdout and "acceptance" in stdout.lower()
    assert "identical to target-only decoding for 5/5 prompts" in stdout
    (result_file,) = out_dir.glob("results_*.json")
    results = json.loads(result_file.read_text())
    assert results["identical_rows"] == 5
    assert len(results["rows"]) == 5
    assert all(row["identical_to_baseline"] for row in results["rows"])
    spec, base = results["speculative"], results["baseline"]
    assert spec["generated_tokens"] == base["generated_tokens"] > 0
    assert sum(spec["acceptance_histogram"]) > 0 and len(spec["acceptance_histogram"]) == 4
    timing = results["timing"]
    assert len(timing["speedups"]) == len(timing["baseline_tokens_per_s"]) == 3  # the default --repeats
    assert timing["speedups"] == [s / b for s, b in zip(timing["speculative_tokens_per_s"],
                                                        timing["baseline_tokens_per_s"])]
    assert results["speedup"] == sorted(timing["speedups"])[1] and results["environment"]["torch"]
    if draft == "target":
        assert spec["acceptance_rate"] == 1.0


def test_end_to_end_sampling_no_baseline(tiny_dir, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text(
        f"target: {tiny_dir}\ndraft: ngram\ntemperature: 0.8\ntop_k: 20\ntop_p: 0.9\n"
        f"batch_size: 2\nmax_new_tokens: 6\ndevice: cpu\noutput_dir: {tmp_path}\n"
    )
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "the quick brown fox"}\n{"prompt": "hello world hello"}\n')
    assert main(["--config", str(config), "--prompts", str(prompts), "--no-baseline", "--seed", "3"]) == 0
    (result_file,) = tmp_path.glob("results_*.json")
    results = json.loads(result_file.read_text())
    assert results["baseline"] is None and results["speedup"] is None
    assert results["config"]["top_p"] == 0.9 and results["config"]["seed"] == 3
    assert all(0 < len(row["speculative_tokens"]) <= 6 for row in results["rows"]) and len(results["rows"]) == 2
    lines = [json.loads(line) for line in (tmp_path / "outputs.jsonl").read_text().splitlines()]
    assert sorted(line["index"] for line in lines) == [0, 1]
    assert {line["index"]: line["generated_tokens"] for line in lines} == \
        {row["index"]: len(row["speculative_tokens"]) for row in results["rows"]}
