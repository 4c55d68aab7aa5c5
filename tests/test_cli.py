import os
import subprocess
import sys

import pytest

from checkpoints import make_checkpoint
from olmo2_fast.cli import main


def test_generate_streams_the_completion(tmp_path, capsys):
    path = make_checkpoint(tmp_path)
    assert main(["generate", "--model", str(path), "The capital", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and "2 layers" in err


def test_int4_lm_head_on_the_default_model(capsys):
    """--int4-lm-head implies --int4: the shipped demo target, projections and lm_head int4, says so."""
    assert main(["generate", "def", "--max-new-tokens", "3", "--int4-lm-head", "--quiet"]) == 0
    assert "int4 (lm_head too)" in capsys.readouterr().err


def test_without_the_trained_demo_it_builds_and_runs_a_random_checkpoint(tmp_path, capsys, monkeypatch):
    import olmo2_fast.demo as demo
    monkeypatch.setattr(demo, "TRAINED_DEMO", tmp_path / "not-shipped")
    monkeypatch.setenv("OLMO2_FAST_HOME", str(tmp_path))
    assert main(["generate", "hello", "--max-new-tokens", "4", "--temperature", "0.7", "--seed", "1"]) == 0
    assert "RANDOM weights" in capsys.readouterr().err
    target = tmp_path / f"demo-v{demo.DEMO_VERSION}"
    assert (target / "model.safetensors").is_file()
    (target / "model.safetensors").unlink()  # a damaged cache is rebuilt, not reported as "no weights"
    assert main(["generate", "hello", "--max-new-tokens", "2", "--int4"]) == 0  # widths of 128: int4 applies
    assert (target / "model.safetensors").is_file()
    read_only = tmp_path / "ro"
    read_only.mkdir()
    read_only.chmod(0o500)
    monkeypatch.setenv("OLMO2_FAST_HOME", str(read_only / "home"))
    try:
        if os.access(read_only, os.W_OK):  # root ignores permissions
            pytest.skip("running as a user that can write anywhere: a read-only home cannot be made")
        assert main(["generate", "hello"]) == 2
        assert "set OLMO2_FAST_HOME to a writable directory" in capsys.readouterr().err
    finally:
        read_only.chmod(0o700)


def test_errors_are_one_line_with_exit_code_2(tmp_path, capsys):
    assert main(["generate", "--model", str(tmp_path / "missing"), "hi"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("olmo2-fast: error: checkpoint directory not found") and "Traceback" not in err


def test_python_dash_m_entry_point(tmp_path):
    path = make_checkpoint(tmp_path)
    env = {**os.environ, "OLMO2_FAST_HOME": str(tmp_path)}
    proc = subprocess.run([sys.executable, "-m", "olmo2_fast", "generate", "--model", str(path), "Hi",
                           "--max-new-tokens", "3"], capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_chat_reads_turns_from_stdin(tmp_path, capsys, monkeypatch):
    import io
    path = make_checkpoint(tmp_path)
    monkeypatch.setattr(sys, "stdin", io.StringIO("Hello\n\nWhat now?\n"))
    assert main(["chat", "--model", str(path), "--max-new-tokens", "4", "--system", "Be brief"]) == 0
    assert capsys.readouterr().out.count("\n") == 2  # one reply line per user turn, the empty line skipped


def test_generate_on_the_kernels_reports_the_cache_and_matches_the_torch_backend(tmp_path, capsys, caplog):
    path = make_checkpoint(tmp_path, hidden_size=64, num_attention_heads=4)  # head_dim 16: a kernel size
    args = ["generate", "--model", str(path), "The capital", "--max-new-tokens", "6"]
    with caplog.at_level("INFO", logger="olmo2_fast"):
        assert main(args + ["--backend", "torch"]) == 0
    assert "allocating KV cache: batch 1 x 256 positions" in caplog.text
    torch_out, err = capsys.readouterr()
    assert main(args + ["--backend", "triton"]) == 0
    triton_out, err = capsys.readouterr()
    assert "backend triton" in err and triton_out == torch_out


def test_stop_escapes_version_and_a_light_parser():
    from olmo2_fast.cli import build_parser, unescape
    args = build_parser().parse_args(["generate", "--stop", r"\n\n", "--stop", r"a\tb\\n\x", "hi"])
    assert args.stop == ["\n\n", "a\tb\\n\\x"]
    assert unescape(r"\r") == "\r"
    # `olmo2-fast --help` must answer at once: building the parser imports neither torch nor triton.
    code = ("import sys\nfrom olmo2_fast.cli import build_parser\nbuild_parser()\n"
            "print(sorted(m for m in ('torch', 'triton', 'numpy') if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout + proc.stderr
    proc = subprocess.run([sys.executable, "-m", "olmo2_fast", "--version"], capture_output=True, text=True, timeout=60)
    from olmo2_fast import __version__
    assert proc.returncode == 0 and proc.stdout.strip() == f"olmo2-fast {__version__}"


def test_a_closed_pipe_ends_generation_quietly(tmp_path):
    path = make_checkpoint(tmp_path)
    env = {**os.environ, "OLMO2_FAST_HOME": str(tmp_path)}
    proc = subprocess.Popen([sys.executable, "-m", "olmo2_fast", "generate", "--model", str(path), "Hi",
                             "--max-new-tokens", "150"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.read(1)  # like `| head -c 1`: read one byte, then hang up
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 0 and "Traceback" not in err, err


def test_generate_prints_a_summary_line_unless_quiet(tmp_path, capsys):
    path = make_checkpoint(tmp_path)
    assert main(["generate", "--model", str(path), "The capital", "--max-new-tokens", "5"]) == 0
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("[olmo2-fast] ") and " new tokens in " in err and "first token after" in err
    assert "stopped: " in err
    assert main(["generate", "--model", str(path), "The capital", "--max-new-tokens", "5", "--quiet"]) == 0
    assert "new tokens in" not in capsys.readouterr().err


def test_undecodable_argv_and_stdin_are_one_line_errors(tmp_path):
    path = make_checkpoint(tmp_path)
    env = {**os.environ, "OLMO2_FAST_HOME": str(tmp_path), "PYTHONIOENCODING": "utf-8"}
    argv = [sys.executable.encode(), b"-m", b"olmo2_fast", b"generate", b"--model", str(path).encode(), b"caf\xe9"]
    proc = subprocess.run(argv, capture_output=True, env=env, timeout=120)
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 2 and "lone surrogate" in err and "Traceback" not in err, err
    chat = subprocess.run([sys.executable, "-m", "olmo2_fast", "chat", "--model", str(path), "--max-new-tokens", "3"],
                          input=b"caf\xe9\nHello\n", capture_output=True, env=env, timeout=120)
    err = chat.stderr.decode(errors="replace")
    assert chat.returncode == 0 and "lone surrogate" in err and "Traceback" not in err, err
    assert chat.stdout.count(b"\n") == 2  # the bad line got its error, the good one its reply


def test_chat_refuses_a_model_without_a_template_before_the_first_prompt(tmp_path, capsys, monkeypatch):
    import io
    import json
    path = make_checkpoint(tmp_path)
    (path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>"}))
    monkeypatch.setattr(sys, "stdin", io.StringIO("never read\n"))
    assert main(["chat", "--model", str(path)]) == 2
    assert "no chat template" in capsys.readouterr().err


def test_without_a_model_it_runs_the_trained_demo_model(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OLMO2_FAST_HOME", str(tmp_path))  # nothing is written there
    assert main(["generate", "The with statement", "--max-new-tokens", "24"]) == 0
    out, err = capsys.readouterr()
    assert "the built-in demo model, a 5.5M-parameter OLMo 2" in err and "knows no facts" in err
    words = [w for w in out.split() if w.isalpha()]
    assert len(words) >= 8 and {"the", "is", "a", "of", "to", "in"} & {w.lower() for w in words}, out
    assert not list(tmp_path.iterdir())
