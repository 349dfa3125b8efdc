"""The README stays true.

Every fenced block of README.md is tagged: ``python`` blocks run (each in a
fresh interpreter); ``sh`` blocks are checked in a cheap form: each line
parses as a shell command, every command is one this test knows (pip install,
python -m pytest/pyfastattn.info, the benchmark scripts, the examples (their
flags in their --help; tests/test_examples.py runs them), scripts/*.sh), every
environment variable set is one setup.py or the code reads, every pip
requirement is installable from a clone (pyfastattn only by path, extras that
exist), every flag of a benchmark command is in that script's --help, and each
benchmark command runs in its --smoke form; ``text`` blocks are not code.
Every ``pip install`` elsewhere in the README (inline code, comments) is
checked like the ones in ``sh`` blocks.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    from pip._vendor import tomli as tomllib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
LANGS = {"python", "sh", "text"}
# environment variables a README command may set: those setup.py and the package read
ENV_VARS = {
    "PYFASTATTN_BUILD_CUDA",
    "PYFASTATTN_CUDA_ARCHS",
    "TORCH_CUDA_ARCH_LIST",
    "MAX_JOBS",
    "CUDA_HOME",
    "PYFASTATTN_DEBUG_INFO",
    "PYFASTATTN_BACKEND",
    "PYFASTATTN_CPU_ISA",
    "PYFASTATTN_CPU_FFN_SCRATCH_MB",
    "PYFASTATTN_FFN_CUDA_PATH",
    "GPU_CHECK_BUDGET_S",
}
PIP_OPTIONS = {"-e", "--editable", "--no-build-isolation", "-q", "--quiet", "-U", "--upgrade", "-v"}
BENCH_SCRIPTS = ("benchmarks/run.py", "benchmarks/ffn_bench.py")


def _text() -> str:
    with open(README) as f:
        return f.read()


def fenced_blocks() -> list[tuple[str, str, int]]:
    """(language, body, first line number) of every fenced block."""
    out, lang, body, start = [], None, [], 0
    for i, line in enumerate(_text().splitlines(), 1):
        if line.startswith("```"):
            if lang is None:
                lang, body, start = line[3:].strip(), [], i
            else:
                out.append((lang, "\n".join(body), start))
                lang = None
        elif lang is not None:
            body.append(line)
    assert lang is None, f"README.md: the block opened on line {start} is never closed"
    return out


def _blocks(lang: str) -> list[tuple[str, int]]:
    return [(body, line) for lg, body, line in fenced_blocks() if lg == lang]


def shell_commands() -> list[tuple[list[str], int]]:
    """(argv, README line) of every simple command in the sh blocks, with
    leading VAR=value assignments kept in argv."""
    cmds = []
    for body, line in _blocks("sh"):
        for text in body.replace("\\\n", " ").splitlines():
            if not text.strip() or text.lstrip().startswith("#"):
                continue
            lex = shlex.shlex(text, posix=True, punctuation_chars=True)
            lex.whitespace_split = True
            argv: list[str] = []
            for tok in [*lex, "&&"]:
                if tok in ("&&", "||", ";", "|"):
                    if argv:
                        cmds.append((argv, line))
                    argv = []
                else:
                    argv.append(tok)
    return cmds


def _split_env(argv: list[str]) -> tuple[dict[str, str], list[str]]:
    env = {}
    while argv and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*=.*", argv[0]):
        k, v = argv[0].split("=", 1)
        env[k] = v
        argv = argv[1:]
    return env, argv


def _extras() -> set[str]:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return set(tomllib.load(f)["project"].get("optional-dependencies", {}))


def pip_problems(args: list[str]) -> list[str]:
    """Why ``pip install <args>`` would not work as written from a clone."""
    try:
        from packaging.requirements import InvalidRequirement, Requirement
    except ImportError:
        from pip._vendor.packaging.requirements import InvalidRequirement, Requirement

    problems = []
    editable = False
    for a in args:
        if a.startswith("-"):
            if a not in PIP_OPTIONS:
                problems.append(f"pip option {a} is not one this test knows")
            editable = a in ("-e", "--editable")
            continue
        if a.startswith((".", "/")):  # a path, maybe with extras: .[transformers]
            path, _, extras = a.partition("[")
            if not os.path.exists(os.path.join(ROOT, path)):
                problems.append(f"{a}: no such path in the clone")
            for e in filter(None, extras.rstrip("]").split(",")):
                if e.strip() not in _extras():
                    problems.append(f"{a}: pyproject.toml has no extra {e.strip()!r}")
            editable = False
            continue
        if editable:
            problems.append(f"-e {a}: not a path of the clone")
        try:
            req = Requirement(a)
        except InvalidRequirement as e:
            problems.append(f"{a}: not a valid requirement ({e})")
            continue
        if req.name.lower() == "pyfastattn":
            problems.append(
                f"{a}: pyfastattn is not on a package index; install it from the clone (pip install -e .)"
            )
    return problems


def _help_flags(script: str) -> set[str]:
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, script), "--help"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
    return set(re.findall(r"(?<![\w-])(--?[A-Za-z][\w-]*)", r.stdout))


def test_every_block_is_tagged_and_the_test_command_is_marked():
    for lang, _, line in fenced_blocks():
        assert lang in LANGS, f"README.md line {line}: tag the block as one of {sorted(LANGS)}, not {lang!r}"
    text = _text()
    marked = re.search(r"<!-- test-command -->\n```sh\n(.+?)\n```\n<!-- /test-command -->", text, re.S)
    assert marked, "README.md: the test command (one sh block between the test-command markers) is gone"
    assert "\n" not in marked.group(1).strip(), ".ci/run runs the marked block as one command line"


def test_test_command_installs_what_the_tests_need():
    """.ci/run runs the marked command in a fresh venv: it must install the
    test extra of pyproject.toml (what tests/ import)."""
    text = _text()
    cmd = re.search(r"<!-- test-command -->\n```sh\n(.+?)\n```", text, re.S).group(1)
    installed = set()
    for part in cmd.split("&&"):
        argv = shlex.split(part)
        if argv[:2] == ["pip", "install"]:
            installed |= {
                re.split(r"[<>=!~\[ ]", a, maxsplit=1)[0].lower() for a in argv[2:] if not a.startswith("-")
            }
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        test_extra = tomllib.load(f)["project"]["optional-dependencies"]["test"]
    need = {re.split(r"[<>=!~\[ ]", r, maxsplit=1)[0].lower() for r in test_extra}
    assert need <= installed, f"the README test command does not install {sorted(need - installed)}"


def test_shell_blocks_parse_and_use_only_known_commands_flags_and_variables():
    cmds = shell_commands()
    assert cmds, "README.md has no sh blocks"
    for body, line in _blocks("sh"):
        r = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True)
        assert r.returncode == 0, f"README.md line {line}: does not parse: {r.stderr}"
    flags = {s: _help_flags(s) for s in BENCH_SCRIPTS}
    for argv, line in cmds:
        env, argv = _split_env(argv)
        where = f"README.md line {line}: {shlex.join(argv)}"
        unknown_env = set(env) - ENV_VARS
        assert not unknown_env, f"{where}: sets {sorted(unknown_env)}, which nothing reads"
        if argv[:2] == ["pip", "install"]:
            problems = pip_problems(argv[2:])
            assert not problems, f"{where}: {problems}"
        elif argv[0] in ("python", "python3") and argv[1:3] == ["-m", "pytest"]:
            paths = [a for a in argv[3:] if not a.startswith("-")]
            assert all(os.path.exists(os.path.join(ROOT, p)) for p in paths), where
        elif argv[0] in ("python", "python3") and argv[1:3] == ["-m", "pyfastattn.info"]:
            pass  # run by test_info_runs
        elif argv[0] in ("python", "python3") and argv[1] in BENCH_SCRIPTS:
            used = {a.split("=", 1)[0] for a in argv[2:] if a.startswith("-")}
            missing = used - flags[argv[1]]
            assert not missing, f"{where}: {sorted(missing)} not in {argv[1]} --help"
        elif argv[0] in ("python", "python3") and argv[1].startswith("examples/"):
            # run for real by tests/test_examples.py; here: the script exists and takes the flags
            assert os.path.isfile(os.path.join(ROOT, argv[1])), f"{where}: no such example"
            used = {a.split("=", 1)[0] for a in argv[2:] if a.startswith("-")}
            missing = used - _help_flags(argv[1])
            assert not missing, f"{where}: {sorted(missing)} not in {argv[1]} --help"
        elif argv[0].startswith("scripts/"):
            assert os.access(os.path.join(ROOT, argv[0]), os.X_OK), f"{where}: not an executable script"
        else:
            pytest.fail(f"{where}: a command this test does not know; teach it how to check it cheaply")


def test_every_pip_install_line_works_from_a_clone():
    """Also the ones in prose, inline code and comments, e.g. an extra's install line."""
    lines = re.findall(r"pip install((?:\s+(?:\"[^\"]*\"|'[^']*'|[^\s`\"')&;:]+))+)", _text())
    assert lines
    for args in lines:
        problems = pip_problems(shlex.split(args))
        assert not problems, f"pip install{args}: {problems}"


@pytest.mark.parametrize("block", range(len(_blocks("python"))))
def test_python_block_runs(block, tmp_path):
    body, line = _blocks("python")[block]
    if "transformers" in body:
        pytest.importorskip("transformers", reason=f"README.md line {line} needs transformers")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYFASTATTN_")}
    r = subprocess.run(
        [sys.executable, "-c", body], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600
    )
    assert r.returncode == 0, f"README.md line {line}:\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"


def test_info_runs():
    r = subprocess.run([sys.executable, "-m", "pyfastattn.info"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr


def _bench_commands() -> list[list[str]]:
    seen, out = set(), []
    for argv, _ in shell_commands():
        _, argv = _split_env(argv)
        if argv[0] in ("python", "python3") and argv[1] in BENCH_SCRIPTS and tuple(argv) not in seen:
            seen.add(tuple(argv))
            out.append(argv[1:])
    return out


@pytest.mark.parametrize("argv", _bench_commands(), ids=lambda a: " ".join(a))
def test_benchmark_command_runs_in_smoke_form(argv, tmp_path):
    """The README's benchmark command with --smoke (tiny shapes, minimal timing)
    instead of its mode, one thread, and output in a temporary folder."""
    args, skip_next = [], False
    for a in argv[1:]:
        if skip_next:
            skip_next = False
            continue
        if a in ("--out", "--threads"):
            skip_next = True
            continue
        if a in ("--quick", "--full", "--record") or a.startswith(("--out=", "--threads=")):
            continue
        args.append(a)
    if "cuda" in args:
        pytest.skip("a CUDA benchmark command: run by scripts/gpu_check.sh on a GPU")
    out = tmp_path / "bench"
    r = subprocess.run(
        [sys.executable, os.path.join(ROOT, argv[0]), *args, "--smoke", "--threads", "1", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert str(out) in r.stdout
    assert any(out.iterdir())
