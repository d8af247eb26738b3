"""fastmoe-train's CPU threads: one per process unless --threads says otherwise, because with torch's default
(one per core) the step time and the evaluations swung widely on a shared machine (docs/training.md)."""

import pytest
import torch
from train_cases import TINY, make_corpus

from fastmoe.train import cli


@pytest.fixture(scope="module")
def corpus_file(tmp_path_factory):
    return make_corpus(tmp_path_factory)


def test_the_default_is_one_thread_and_the_help_says_so():
    parser = cli.build_parser()
    assert parser.parse_args([]).threads == 1
    text = " ".join(parser.format_help().split())
    assert "--threads THREADS CPU threads of torch in each process (default: 1; 0 leaves torch's choice" in text


@pytest.mark.parametrize("flags", [[], ["--threads", "0"], ["--threads", "2"]], ids=["default", "0", "2"])
def test_a_run_trains_on_its_threads_and_gives_the_callers_back(corpus_file, tmp_path, capsys, flags):
    before = torch.get_num_threads()
    argv = [*TINY, "--model", "moe", "--steps", "1", "--eval-every", "0", "--data", str(corpus_file)]
    assert cli.main([*argv, *flags, "--out", str(tmp_path)]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    expected = {"default": 1, "0": before, "2": 2}[flags[-1] if flags else "default"]
    assert f", {expected} CPU threads," in header, header
    assert torch.get_num_threads() == before


def test_a_negative_thread_count_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--threads", "-1", "--data", "/nonexistent/fastmoe-train-corpus"])
    assert exit_info.value.code == 2
    assert "--threads must be >= 0, got -1" in capsys.readouterr().err
