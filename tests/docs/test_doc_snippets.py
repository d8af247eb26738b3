"""Every code block of README.md and docs/*.md runs as written, on the CPU, as its own test named by file and line
(``README.md:83``), so that the documentation cannot drift from the code.

How a block runs follows its language:

- ``python``: as a script in a fresh process whose working folder is empty, importing fastmoe from this tree, with
  no GPU visible;
- ``bash``: under ``bash -euo pipefail`` in the repository root, where ``python`` is this interpreter;
- no language: text (command output, a folder layout, a diagram), not collected;
- any other language (``cpp``, ``cmake``) has no runner here, so the block must be marked skipped.

An HTML comment on the line before the opening fence (invisible in the rendered page) changes that:

- ``<!-- snippet: skip (REASON) -->``: the test is skipped with REASON, for what a CPU machine cannot run in
  seconds (a GPU, a torchrun job of 8 processes, a build, a multi-minute training run);
- ``<!-- snippet: torchrun N -->``: a python block runs as N processes started the way ``torchrun
  --nproc-per-node N`` starts them (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set, one thread
  each), which join over gloo because no GPU is visible.

Blocks share nothing: each one runs on its own, so a page's examples stay copyable one at a time.
"""

import os
import re
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNERS = ("python", "bash")
TIMEOUT_S = 180
FENCE = re.compile(r"^(\s*)```(\S*)\s*$")
MARKER = re.compile(r"^\s*<!--\s*snippet:\s*(.*?)\s*-->\s*$")


@dataclass
class Snippet:
    path: Path
    line: int  # of the opening fence, from 1
    language: str
    code: str
    marker: str | None  # the text after "snippet:" of the comment before the fence

    @property
    def name(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def extract(path: Path) -> list[Snippet]:
    """The fenced blocks of ``path`` that carry a language, with the marker comment before each."""
    lines = path.read_text().splitlines()
    snippets, i = [], 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, language = opening.groups()
        end = i + 1
        while end < len(lines) and lines[end].strip() != "```":
            end += 1
        if end == len(lines):
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: a code block that is never closed")
        body = [line[len(indent) :] if line.startswith(indent) else line for line in lines[i + 1 : end]]
        previous = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        marker = MARKER.match(previous)
        if language:
            snippets.append(Snippet(path, i + 1, language, "\n".join(body) + "\n", marker and marker.group(1)))
        i = end + 1
    return snippets


SNIPPETS = [snippet for path in DOCS for snippet in extract(path)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def snippet_env() -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "python"), env.get("PYTHONPATH")]))
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["CUDA_VISIBLE_DEVICES"] = ""  # the CPU path, on a GPU machine too
    return env


def run_processes(commands: list[tuple[list, dict]], cwd: Path) -> list[subprocess.CompletedProcess]:
    """Starts every command at once and waits for all of them; when one fails or the time runs out, the others
    are stopped (a rank whose peer died would wait in its next collective until gloo's timeout)."""
    procs = [
        subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for cmd, env in commands
    ]
    outputs = [None] * len(procs)
    try:
        for rank, proc in enumerate(procs):
            outputs[rank] = proc.communicate(timeout=TIMEOUT_S)[0]
            if proc.returncode != 0:
                break
    except subprocess.TimeoutExpired:
        pass
    finally:
        for rank, proc in enumerate(procs):
            if proc.poll() is None:
                proc.kill()
            if outputs[rank] is None:
                outputs[rank] = proc.communicate()[0]
    return [
        subprocess.CompletedProcess(cmd, proc.returncode, out, None)
        for (cmd, _), proc, out in zip(commands, procs, outputs, strict=True)
    ]


def plan(snippet: Snippet) -> tuple[str | None, int]:
    """``(skip reason or None, process count)`` from the block's marker; a malformed marker fails the test."""
    if snippet.marker is None:
        assert snippet.language in RUNNERS, (
            f"{snippet.name}: a ```{snippet.language} block cannot run here; mark it "
            "<!-- snippet: skip (REASON) --> on the line before it"
        )
        return None, 1
    skip = re.fullmatch(r"skip \((.+)\)", snippet.marker)
    if skip:
        return skip.group(1), 1
    torchrun = re.fullmatch(r"torchrun ([1-9][0-9]*)", snippet.marker)
    assert torchrun and snippet.language == "python", (
        f"{snippet.name}: the marker must be 'skip (REASON)', or 'torchrun N' on a python block, got "
        f"{snippet.marker!r} on a ```{snippet.language} block"
    )
    return None, int(torchrun.group(1))


@pytest.mark.parametrize("snippet", [pytest.param(s, id=s.name) for s in SNIPPETS])
def test_snippet_runs(snippet: Snippet, tmp_path):
    reason, processes = plan(snippet)
    if reason is not None:
        pytest.skip(f"{snippet.name}: {reason}")
    env = snippet_env()
    if snippet.language == "bash":
        commands, cwd = [(["bash", "-euo", "pipefail", "-c", snippet.code], env)], ROOT
    else:
        script = tmp_path / "snippet.py"
        script.write_text(snippet.code)
        cwd, commands = tmp_path / "work", []
        cwd.mkdir()
        if processes == 1:
            commands.append(([sys.executable, str(script)], env))
        else:
            port = str(free_port())
            for rank in range(processes):
                rank_env = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=port, OMP_NUM_THREADS="1")
                rank_env.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(processes))
                rank_env.update(LOCAL_WORLD_SIZE=str(processes), GROUP_RANK="0")
                commands.append(([sys.executable, str(script)], rank_env))
    results = run_processes(commands, cwd)
    failed = [(rank, r) for rank, r in enumerate(results) if r.returncode != 0]
    report = "\n".join(f"--- process {rank}, exit {r.returncode}:\n{r.stdout[-4000:]}" for rank, r in failed)
    assert not failed, f"{snippet.name} failed as written:\n{snippet.code}\n{report}"


def test_every_block_with_a_language_is_collected():
    """A fence that the extraction pairs wrongly (a text block read as closed by the next block's opening) would
    make a block silently stop being tested: every line that opens a block with a language must be a snippet."""
    openings = {
        f"{path.relative_to(ROOT)}:{number}"
        for path in DOCS
        for number, line in enumerate(path.read_text().splitlines(), start=1)
        if re.match(r"^\s*```[A-Za-z]", line)
    }
    assert openings == {s.name for s in SNIPPETS}
    assert {"python", "bash"} <= {s.language for s in SNIPPETS}
