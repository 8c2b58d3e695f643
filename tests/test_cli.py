"""The loraserve command line."""

from __future__ import annotations

import json
import subprocess
import sys

from loraserve.cli import main


def test_help_lists_subcommands():
    out = subprocess.run(
        [sys.executable, "-m", "loraserve.cli", "--help"], capture_output=True, text=True
    )
    assert out.returncode == 0 and "generate" in out.stdout


def test_generate_token_ids_json(tiny_model_factory, capsys):
    model = str(tiny_model_factory())
    argv = ["generate", "--model", model, "--token-ids", "5,6,7", "--token-ids", "8,9"]
    argv += ["--max-tokens", "4", "--json", "--logprobs", "2", "--ignore-eos"]
    assert main(argv) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 2
    assert all(len(x["token_ids"]) == 4 and len(x["logprobs"]) == 4 for x in lines)


def test_generate_bad_input_is_a_clear_error(tiny_model_factory, capsys):
    assert main(["generate", "--model", "nowhere", "hi"]) == 2
    assert "nowhere" in capsys.readouterr().err
    model = str(tiny_model_factory())
    assert main(["generate", "--model", model, "--token-ids", "1,2", "--top-p", "2"]) == 2
    assert "top_p" in capsys.readouterr().err


def test_make_adapters_then_generate_with_one(tiny_model_factory, tmp_path, capsys):
    from loraserve.adapters.peft import read_adapter_config

    model = str(tiny_model_factory())
    out = tmp_path / "adapters"
    argv = ["make-adapters", "--model", model, "--out", str(out), "-n", "3", "--ranks", "2,4"]
    assert main([*argv, "--targets", "all"]) == 0
    paths = capsys.readouterr().out.split()
    assert len(paths) == 3
    assert [read_adapter_config(p).r for p in paths] == [2, 4, 2]
    base = ["generate", "--model", model, "--token-ids", "5,6,7", "--max-tokens", "6"]
    base += ["--ignore-eos", "--json"]
    assert main(base) == 0
    plain = json.loads(capsys.readouterr().out)["token_ids"]
    assert main([*base, "--adapter", f"x={paths[1]}", "--use", "x"]) == 0
    adapted = json.loads(capsys.readouterr().out)["token_ids"]
    assert len(adapted) == 6 and adapted != plain
    assert main([*base, "--use", "missing"]) == 2
    assert "missing" in capsys.readouterr().err
