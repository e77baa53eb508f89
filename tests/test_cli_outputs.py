"""The CLI as a generation tool: every prompt of a file, prompt checks before any forward, outputs.jsonl streamed as
prompts finish, resume after a crash, and the results JSON agreeing with the printed report."""

import json
import os
import re
import statistics

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
from test_main import run_main_expect_error

from batched_specdec import main as cli
from batched_specdec.main import main
from batched_specdec.outputs import OutputWriter, read_done

WORDS = ["the", "quick", "brown", "fox", "jumps", "over", "lazy", "dog", "hello", "world", "one", "two", "three", "a",
         "cat", "is", "in"]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from test_models import make_tiny_model_dir

    return make_tiny_model_dir(tmp_path_factory.mktemp("tiny-cli-outputs"))


def _prompt_file(tmp_path, n: int, name: str = "prompts.jsonl"):
    """``n`` JSONL prompts of different lengths, each with an id and a metadata field."""
    path = tmp_path / name
    lines = [json.dumps({"id": f"q{i}", "prompt": " ".join(WORDS[(i * 3 + j) % len(WORDS)] for j in range(2 + i % 5)),
                         "meta": {"k": i}}) for i in range(n)]
    path.write_text("\n".join(lines) + "\n")
    return path


def _run_argv(tiny_dir, prompts, out_dir, *extra):
    return ["--target", tiny_dir, "--draft", "ngram", "--prompts", str(prompts), "--device", "cpu", "--gamma", "3",
            "--batch-size", "3", "--max-new-tokens", "10", "--output-dir", str(out_dir), *extra]


def _flat(text: str) -> str:
    """Console output with rich's line wrapping undone."""
    return " ".join(text.split())


_argv = _run_argv


def _lines(out_dir):
    return [json.loads(line) for line in (out_dir / "outputs.jsonl").read_text().splitlines()]


def test_every_prompt_of_a_file_streams_to_outputs_jsonl_with_its_fields(tiny_dir, tmp_path, capsys):
    """No --num-prompts: the whole file (11 prompts, more than the built-in default of 8), each line with the
    input's id and metadata, and the same tokens as the results JSON."""
    prompts, out = _prompt_file(tmp_path, 11), tmp_path / "out"
    assert main(_argv(tiny_dir, prompts, out, "--no-baseline", "--logprobs")) == 0
    stdout = _flat(capsys.readouterr().out)
    assert "11 prompts" in stdout and "1 repeat." in stdout and "compared" not in stdout
    lines = _lines(out)
    assert sorted(line["id"] for line in lines) == sorted(f"q{i}" for i in range(11))
    assert all(line["id"] == f"q{line['index']}" and line["meta"] == {"k": line["index"]} for line in lines)
    assert all(line["finish_reason"] in ("stop", "length") and len(line["logprobs"]) == line["generated_tokens"]
               for line in lines)
    (result_file,) = out.glob("results_*.json")
    rows = {row["index"]: row for row in json.loads(result_file.read_text())["rows"]}
    assert all(rows[line["index"]]["speculative_text"] == line["completion"] for line in lines)
    assert all(len(rows[line["index"]]["speculative_tokens"]) == line["generated_tokens"] for line in lines)


@pytest.mark.parametrize("sampling", [(), ("--temperature", "0.9", "--sampling-scheme", "coupled", "--gamma", "auto")])
def test_a_killed_run_resumes_where_it_stopped_and_matches_an_uninterrupted_run(tiny_dir, tmp_path, monkeypatch,
                                                                                capsys, sampling):
    """A run stopped after 4 of 10 prompts (and a half-written line) resumes with --resume: every prompt once, every
    output identical to an uninterrupted run's, greedy and coupled-sampled; resuming a finished run decodes
    nothing."""
    prompts = _prompt_file(tmp_path, 10)
    full, broken = tmp_path / "full", tmp_path / "broken"

    def _argv(*args):
        return _run_argv(*args, *sampling)

    assert main(_argv(tiny_dir, prompts, full, "--no-baseline")) == 0
    write = OutputWriter.write

    def crash_after_four(self, *args):
        if self.written == 4:
            raise KeyboardInterrupt  # what a kill leaves behind: the lines written before it
        write(self, *args)

    monkeypatch.setattr(OutputWriter, "write", crash_after_four)
    with pytest.raises(SystemExit) as info:
        main(_argv(tiny_dir, prompts, broken, "--no-baseline"))
    assert info.value.code == 130 and len(_lines(broken)) == 4
    with (broken / "outputs.jsonl").open("a") as f:
        f.write('{"index": 9, "completion": "half a li')  # cut short by the kill
    monkeypatch.setattr(OutputWriter, "write", write)
    capsys.readouterr()
    assert main(_argv(tiny_dir, prompts, broken, "--no-baseline", "--resume")) == 0
    assert "Resuming: 4 of 10 prompts" in _flat(capsys.readouterr().out)
    got, want = _lines(broken), _lines(full)
    assert sorted(line["index"] for line in got) == list(range(10))
    strip = {"index", "id", "meta", "completion", "generated_tokens", "finish_reason"}
    assert {g["index"]: {k: g[k] for k in strip} for g in got} == {w["index"]: {k: w[k] for k in strip} for w in want}
    before = (broken / "outputs.jsonl").read_text()
    assert main(_argv(tiny_dir, prompts, broken, "--no-baseline", "--resume")) == 0
    assert "nothing to decode" in _flat(capsys.readouterr().out) and (broken / "outputs.jsonl").read_text() == before


def test_resume_refuses_other_options_other_prompts_and_an_existing_run(tiny_dir, tmp_path, capsys):
    prompts, out = _prompt_file(tmp_path, 3), tmp_path / "out"
    assert main(_argv(tiny_dir, prompts, out, "--no-baseline")) == 0
    line = run_main_expect_error(_argv(tiny_dir, prompts, out, "--no-baseline"), capsys)
    assert "outputs.jsonl already holds results: pass --resume" in line
    line = run_main_expect_error(_argv(tiny_dir, prompts, out, "--no-baseline", "--resume", "--max-new-tokens", "7"),
                                 capsys)
    assert "--max-new-tokens is 7 but the run in" in line and "used 10" in line
    other = _prompt_file(tmp_path, 4, "other.jsonl")
    assert "the prompts differ" in run_main_expect_error(_argv(tiny_dir, other, out, "--no-baseline", "--resume"),
                                                         capsys)
    assert "--resume continues a generation run: it needs --no-baseline" in \
        run_main_expect_error(_argv(tiny_dir, prompts, out, "--resume"), capsys)
    with pytest.raises(SystemExit) as info:
        main(_argv(tiny_dir, prompts, tmp_path / "new", "--no-baseline", "--resume"))
    assert info.value.code == 2


def test_read_done_keeps_whole_lines_and_refuses_a_broken_one(tmp_path):
    path = tmp_path / "outputs.jsonl"
    path.write_text('{"index": 0}\n{"index": 2}\n{"ind')
    assert set(read_done(tmp_path)) == {0, 2} and path.read_text() == '{"index": 0}\n{"index": 2}\n'
    path.write_text('{"index": 0}\nnot json\n{"index": 2}\n')
    with pytest.raises(ValueError, match="line 2 is not an output record"):
        read_done(tmp_path)


@pytest.mark.parametrize("extra, message", [
    ((), "line 2 of prompts file"),  # the long prompt, by its line
    (("--max-new-tokens", "300"), "line 1 of prompts file"),  # a budget that overflows the context
])
def test_prompts_the_model_cannot_take_exit_2_before_any_forward(tiny_dir, tmp_path, monkeypatch, capsys, extra,
                                                                  message):
    from transformers import AutoConfig

    positions = AutoConfig.from_pretrained(tiny_dir).max_position_embeddings
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello world\n" + " ".join(["the"] * (positions + 5)) + "\n")
    monkeypatch.setattr(cli, "warm_up", lambda *a: pytest.fail("a forward ran before the prompt check"))
    argv = ["--target", tiny_dir, "--draft", "ngram", "--prompts", str(prompts), "--device", "cpu",
            "--max-new-tokens", "4", *extra]
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err.strip()
    assert info.value.code == 2 and message in err and "max_position_embeddings" in err and "\n" not in err


def test_bad_flags_exit_2_and_name_the_flag(tmp_path, capsys):
    for argv, expected in [(["--dtype", "float8"], "--dtype: invalid choice: 'float8'"),
                           (["--schedule", "fast"], "--schedule: invalid choice"),
                           (["--ngram-min", "4", "--ngram-max", "2"], "--ngram-max must be >= --ngram-min (4), got 2"),
                           (["--logprobs"], "--logprobs writes log-probabilities to outputs.jsonl"),
                           (["--cuda-graphs", "--compile"], "--cuda-graphs and --compile are two ways")]:
        with pytest.raises(SystemExit) as info:
            main(argv)
        assert info.value.code == 2 and expected in capsys.readouterr().err
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(SystemExit) as info:
            main(["--device", "cuda"])
        assert info.value.code == 2 and "--device cuda: CUDA is not available" in capsys.readouterr().err
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "hi", "completion": "x"}\n')
    line = run_main_expect_error(["--prompts", str(prompts), "--device", "cpu"], capsys)
    assert "line 1 of prompts file" in line and "'completion' is written by the output" in line
    line = run_main_expect_error(["--prompts", str(prompts), "--num-prompts", "3", "--device", "cpu"], capsys)
    assert "--num-prompts 3 asks for more prompts than" in line


def test_report_and_results_json_agree_and_greedy_ignores_top_p(tiny_dir, tmp_path, capsys):
    """The JSON's tokens/s are the medians the report prints, with every repeat listed; panel titles keep their
    verdict at 80 columns; --top-p under greedy decoding is ignored with a warning, as model.generate does."""
    prompts = _prompt_file(tmp_path, 4)
    assert main(_argv(tiny_dir, prompts, tmp_path, "--top-p", "0.9", "--show-output")) == 0
    stdout = capsys.readouterr().out
    assert "Ignoring --top-p 0.9" in _flat(stdout) and "3 repeats of each method" in _flat(stdout)
    assert len(re.findall(r"prompt \d: identical to target-only", stdout)) == 4
    results = json.loads(next(tmp_path.glob("results_*.json")).read_text())
    for method in ("baseline", "speculative"):
        runs = results[method]["tokens_per_s_runs"]
        assert len(runs) == 3 and results[method]["tokens_per_s"] == statistics.median(runs)
        assert results[method]["wall_time_s"] == statistics.median(results[method]["wall_time_s_runs"])
    printed = re.search(r"tokens/s \(median\)\s*│\s*([\d.]+)\s*│\s*([\d.]+)", stdout)
    assert printed.groups() == (f"{results['baseline']['tokens_per_s']:.1f}",
                                f"{results['speculative']['tokens_per_s']:.1f}")


def test_coupled_sampling_is_compared_token_for_token(tiny_dir, tmp_path, capsys):
    """Under --sampling-scheme coupled the sampled outputs of both methods are the same and the CLI checks it."""
    prompts = _prompt_file(tmp_path, 5)
    assert main(_argv(tiny_dir, prompts, tmp_path, "--temperature", "0.9", "--top-k", "20", "--sampling-scheme",
                      "coupled", "--gamma", "auto", "--repeats", "1")) == 0
    stdout = _flat(capsys.readouterr().out)
    assert "coupled sampling from --seed 0" in stdout
    assert "Sampled (coupled) outputs identical to target-only decoding for 5/5 prompts" in stdout
    results = json.loads(next(tmp_path.glob("results_*.json")).read_text())
    assert results["sampling_scheme"] == "coupled" and results["identical_rows"] == 5


def test_cuda_graphs_flag_runs_both_methods_through_the_graph_path(tiny_dir, tmp_path, capsys):
    """--cuda-graphs (on a CPU: the checking stand-in) decodes both methods to the same greedy tokens."""
    prompts = _prompt_file(tmp_path, 4)
    assert main(_argv(tiny_dir, prompts, tmp_path, "--cuda-graphs", "--repeats", "1")) == 0
    assert "Greedy outputs identical to target-only decoding for 4/4 prompts" in _flat(capsys.readouterr().out)
    results = json.loads(next(tmp_path.glob("results_*.json")).read_text())
    assert results["config"]["cuda_graphs"] is True
