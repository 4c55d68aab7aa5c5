import os
import subprocess
import sys

from checkpoints import make_checkpoint
from olmo2_fast.cli import main


def test_generate_streams_the_completion(tmp_path, capsys):
    path = make_checkpoint(tmp_path)
    assert main(["generate", "--model", str(path), "The capital", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert out.endswith("\n") and "2 layers" in err


def test_without_a_model_it_builds_and_runs_the_demo_checkpoint(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("OLMO2_FAST_HOME", str(tmp_path))
    assert main(["generate", "hello", "--max-new-tokens", "4", "--temperature", "0.7", "--seed", "1"]) == 0
    assert "RANDOM weights" in capsys.readouterr().err
    assert (tmp_path / "demo-v1" / "model.safetensors").is_file()


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
