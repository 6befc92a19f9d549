"""Documentation that is executed: every shell command of README.md, BUILD.md and docs/*.md runs.

A fenced block's language says what it is:

  ```bash / ```sh / ```shell   a script: every command in it runs (continuation lines and multi-line
                               quotes are one command; comment lines are not commands);
  ```console                   a transcript: the lines starting with `$ ` are commands, the rest output;
  ```text / ```python / ...    not run; such a block must not hold a shell command;
  ``` (no language)            an error: say which of the above it is.

Each document runs in its own fresh copy of the repository tree (a temporary folder; the repository
itself is never written), its commands in document order, so a fine-tuning finds the pretraining run
an earlier command wrote there. `python` and `.venv/bin/python` are this interpreter. The plain
`python -m experiments.train|evaluate ...` commands (most of them) run in one Python process per
document, tests/docs_runner.py, as `python -m` runs them (TensorFlow and JAX import once, not once a
command); any other command, or one with shell syntax or an environment prefix, runs through bash.
Step counts are shortened by `JTL_MAX_STEPS` (jtl/config.py `clip_to_max_steps`: `total_steps`
clipped, warmups and phases fitted), so a documented 3,000-step run takes two; the commands themselves
are run as written.
A command that several documents run word for word (the 2-step pretraining into `runs/pre`, five
times) runs once per session: the other documents copy its outputs (`_once_per_session`).

A command that cannot run here (accelerators, several hosts, network, a cloud account, the long
benchmarks and table scripts, `make test` itself) is listed in `EXCEPTED` with its reason. A command
that is neither run successfully nor listed fails the test, and so does an `EXCEPTED` entry that no
longer matches any command (the docs moved on: update the list).
"""
from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import json
import os
import re
import select
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
DOCS = ("README.md", "BUILD.md", *sorted(f"docs/{p.name}" for p in (REPO / "docs").glob("*.md")))
SCRIPT_LANGS = {"bash", "sh", "shell"}
CONSOLE_LANGS = {"console"}
NOT_RUN_LANGS = {"text", "python", "yaml", "json", "toml", "ini", "diff"}
IN_PROCESS_MODULES = ("experiments.train", "experiments.evaluate")  # in_process_argv
MAX_STEPS = "2"  # JTL_MAX_STEPS for every documented run
COMMAND_TIMEOUT_S = 900  # a busy machine; building the glyphs dataset takes 75-90 s on an idle one
# Lines of a not-run block that look like a shell command (they belong in a bash block, or after `$ `).
_LOOKS_LIKE_COMMAND = re.compile(r"^\s*(python3?|\.venv/bin/\w+|make|pip|bash|gcloud|sbatch)\s")
# What the copy of the repository leaves out: version control, environments, run outputs.
_NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "*.egg-info", "__pycache__", ".pytest_cache",
                                     "workdirs", "runs", "my_images")

# (document, the command's start, why it does not run here). A command is excepted when its text,
# whitespace-normalised, starts with the given start; every entry must match at least one command.
EXCEPTED: tuple[tuple[str, str, str], ...] = (
    ("README.md", "make demo", "tests/test_demo.py runs `make demo` itself"),
    ("README.md", "make test", "the test suite itself"),
    ("README.md", "make mutants", "the mutation harness: hours on 2 cores (docs/mutants.md)"),
    ("README.md", ".venv/bin/python -m experiments.mutants --only",
     "runs mutations (minutes each); tests/test_mutants.py checks the harness"),
    ("BUILD.md", "python3 -m venv .venv && .venv/bin/pip install", "an install (network, minutes)"),
    ("BUILD.md", "python -m experiments.train --config=... --workdir=gs://bucket/run",
     "multi-host launch on a cluster (`...` for the user's config; tests/test_launch.py)"),
    ("BUILD.md", "XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m experiments.train ...",
     "two-process launch template (`...` for the user's config); tests/test_launch.py runs it"),
    ("docs/cloud.md", "python -m experiments.train --config=experiments/configs/pretrain_digits.py "
     "--workdir=gs://", "needs a GCS bucket, or the emulator's environment; tests/test_gcs.py"),
    ("docs/cloud.md", "python -m experiments.evaluate --workdir=gs://",
     "needs a GCS bucket, or the emulator's environment; tests/test_gcs.py"),
    ("docs/cloud.md", "python -m experiments.gcs_emulator",
     "a server that runs until Ctrl-C; tests/test_gcs.py starts it"),
    ("docs/cloud.md", "export ", "the environment the emulator prints (its ports differ per run)"),
    ("docs/cloud.md", "tensorboard --logdir=gs://", "a server; needs the emulator's environment"),
    ("docs/running.md", ".venv/bin/python -m experiments.gcs_emulator",
     "a server that runs until Ctrl-C; tests/test_gcs.py starts it"),
    ("docs/running.md", "python -m experiments.train --config=experiments/configs/pretrain_digits.py "
     "--workdir=gs://", "needs the emulator's environment; tests/test_gcs.py"),
    ("docs/running.md", "python -m experiments.evaluate --workdir=gs://",
     "needs the emulator's environment; tests/test_gcs.py"),
    ("docs/mutants.md", "make mutants", "the mutation harness: hours on 2 cores"),
    ("docs/mutants.md", "python -m experiments.mutants --only",
     "runs mutations (minutes each); tests/test_mutants.py checks the harness"),
    ("docs/mutants.md", "python -m experiments.mutants --shard", "runs a quarter of the mutations"),
    ("docs/mutants.md", "python -m experiments.mutants --baseline ...",
     "`...` for the user's selection; runs the mapped tests"),
    ("docs/performance.md", "pip install -e .[bench]", "an install (PyTorch, network, minutes)"),
    ("docs/performance.md", "python -m experiments.bench.", "a benchmark (minutes; figures, not tests)"),
    ("docs/accumulation.md", "python -m experiments.bench.", "a benchmark (minutes; figures, not tests)"),
    ("docs/tfds.md", "python -m experiments.train --config=experiments/configs/finetune_tfds.py:"
     "dataset=cifar10,model=vit_small,weights=", "needs a downloaded weights file and the real "
     "dataset; tests/test_real_resolution.py runs it at 224 on stand-ins"),
    ("docs/tfds.md", "python -m experiments.evaluate --workdir=runs/cifar10_vit_lora",
     "evaluates the run above"),
)


@dataclasses.dataclass(frozen=True)
class Block:
  doc: str
  line: int  # of the opening fence, 1-based
  lang: str
  lines: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class Command:
  doc: str
  line: int
  text: str

  @property
  def normalised(self) -> str:
    return " ".join(self.text.replace("\\\n", " ").split())


def blocks(doc: str) -> list[Block]:
  """The fenced code blocks of `doc` (fences may be indented, as inside a list item)."""
  out, opening, body = [], None, []
  for number, line in enumerate((REPO / doc).read_text().split("\n"), 1):
    fence = re.match(r"^(\s*)```(.*)$", line)
    if opening is None and fence:
      opening, indent, body = (number, fence.group(2).strip()), len(fence.group(1)), []
    elif opening is not None and fence and not fence.group(2).strip():
      out.append(Block(doc, opening[0], opening[1], tuple(body)))
      opening = None
    elif opening is not None:
      body.append(line[indent:] if not line[:indent].strip() else line.lstrip())
  assert opening is None, f"{doc}:{opening[0]}: a code fence is never closed"
  return out


def _complete(text: str) -> bool:
  """Whether `text` is a complete shell command (no open quote, no unfinished construct)."""
  return subprocess.run(["bash", "-n"], input=text, capture_output=True, text=True).returncode == 0


def commands(block: Block) -> list[Command]:
  """The commands of a shell or console block, each with the line it starts on."""
  if block.lang in CONSOLE_LANGS:
    return [Command(block.doc, block.line + 1 + i, line[2:].strip())
            for i, line in enumerate(block.lines) if line.startswith("$ ")]
  out, buffer, start = [], [], 0
  for i, line in enumerate(block.lines):
    if not buffer and (not line.strip() or line.lstrip().startswith("#")):
      continue
    if not buffer:
      start = block.line + 1 + i
    buffer.append(line)
    text = "\n".join(buffer)
    if not line.rstrip().endswith("\\") and _complete(text):
      out.append(Command(block.doc, start, text.strip()))
      buffer = []
  assert not buffer, f"{block.doc}:{start}: an incomplete shell command: {' '.join(buffer)[:200]}"
  return out


def all_commands(doc: str) -> list[Command]:
  return [c for b in blocks(doc) if b.lang in SCRIPT_LANGS | CONSOLE_LANGS for c in commands(b)]


def exception_for(command: Command) -> tuple[str, str, str] | None:
  for entry in EXCEPTED:
    if entry[0] == command.doc and command.normalised.startswith(entry[1]):
      return entry
  return None


def to_run(doc: str) -> list[Command]:
  return [c for c in all_commands(doc) if exception_for(c) is None]


def test_every_block_says_what_it_is_and_every_exception_is_used():
  problems = []
  for doc in DOCS:
    for block in blocks(doc):
      where = f"{doc}:{block.line}"
      if not block.lang:
        problems.append(f"{where}: a code block without a language: tag it ```bash (its commands "
                        "run in tests/test_docs.py) or ```text (output, not run)")
      elif block.lang not in SCRIPT_LANGS | CONSOLE_LANGS | NOT_RUN_LANGS:
        problems.append(f"{where}: unknown block language {block.lang!r} (known: "
                        f"{sorted(SCRIPT_LANGS | CONSOLE_LANGS | NOT_RUN_LANGS)})")
      elif block.lang in NOT_RUN_LANGS:
        problems += [f"{where}: a ```{block.lang} block holds a shell command ({line.strip()[:80]!r}): "
                     "put it in a ```bash block so that it runs" for line in block.lines
                     if _LOOKS_LIKE_COMMAND.match(line)]
  for entry in EXCEPTED:
    doc, start, reason = entry
    assert reason.strip(), entry
    if not any(exception_for(c) == entry for c in all_commands(doc) if c.doc == doc):
      problems.append(f"EXCEPTED entry {entry[:2]} matches no command of {doc}: remove or update it")
  assert not problems, "\n".join(problems)


def _anchors(doc: Path) -> set[str]:
  """GitHub's anchors for the headings of `doc`: lower case, punctuation dropped, spaces to '-'."""
  headings = re.findall(r"^#+ (.+)$", doc.read_text(), flags=re.M)
  return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_links_between_pages_resolve():
  """Every relative link of README.md, BUILD.md and docs/ names a file that exists and, with
  `#anchor`, a heading of that file."""
  broken = []
  for doc in DOCS:
    text = re.sub(r"```.*?```", "", (REPO / doc).read_text(), flags=re.S)
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
      if re.match(r"^[a-z]+:", target):
        continue
      path, _, anchor = target.partition("#")
      file = (REPO / doc).parent / path if path else REPO / doc
      if not file.exists():
        broken.append(f"{doc}: ({target}): no file {path}")
      elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
        broken.append(f"{doc}: ({target}): {path or doc} has no heading #{anchor}")
  assert not broken, "\n".join(broken)


def test_the_slow_documents_exist():
  assert set(SLOW_DOCS) <= set(DOCS), set(SLOW_DOCS) - set(DOCS)


def test_commands_are_found():
  """The extraction itself, on blocks written here: continuation lines and multi-line quotes are
  one command, comments are not commands, `$ ` marks a console block's commands."""
  script = Block("x.md", 10, "bash", ("# a comment", "python -m a \\", "  --b=c", "",
                                      "python -c \"", "print(1)", "\"", "make demo   # a note"))
  assert [(c.line, c.normalised) for c in commands(script)] == [
      (12, "python -m a --b=c"), (15, 'python -c " print(1) "'), (18, "make demo # a note")]
  console = Block("x.md", 3, "console", ("$ python -m bench --rounds=7", "model  steps/s", "mlp 1.0"))
  assert [(c.line, c.text) for c in commands(console)] == [(4, "python -m bench --rounds=7")]


def test_commands_that_several_documents_run_are_shared_with_their_outputs():
  pretrain = [c for d in DOCS for c in to_run(d) if c.normalised == (
      "python -m experiments.train --config=experiments/configs/pretrain_digits.py --workdir=runs/pre")]
  assert len(pretrain) >= 2 and {shared_outputs(c) for c in pretrain} == {("runs/pre",)}
  assert shared_outputs(Command("x.md", 1, "python -m experiments.train --workdir=runs/only_here")) == ()


def test_which_commands_run_in_the_documents_process():
  plain = "python -m experiments.train \\\n  --config=c.py --workdir=runs/a  # a note (x) | y"
  assert in_process_argv(Command("x.md", 1, plain)) == [
      "experiments.train", "--config=c.py", "--workdir=runs/a"]
  assert in_process_argv(Command("x.md", 1, ".venv/bin/python -m experiments.evaluate --workdir=w"))
  for shell in ("XLA_FLAGS=x python -m experiments.train --workdir=w",
                "python -m experiments.evaluate --workdir=w > out.txt",
                "python -m experiments.evaluate --workdir=w && ls w",
                "python -m experiments.evaluate --workdir=$HOME/w",
                "python -m experiments.train --workdir=w --verbosity=1",
                "python -m experiments.sweep --config=c.py --workdir=w", "make demo"):
    assert in_process_argv(Command("x.md", 1, shell)) is None, shell


def test_the_documents_process_gives_each_command_its_status_output_and_fresh_flags(tmp_path):
  """Two failing commands in one process: each its own exit status and error line (so a documented
  command that fails fails the test), the second one's flags defined again after the first's."""
  tree = _fresh_tree(tmp_path)
  process = _DocProcess(tree, _environment(tree), tmp_path)
  try:
    status, output = process.run(["experiments.train", "--config=nope.py", "--workdir=runs/a"])
    assert status == 2 and "error: config file 'nope.py' does not exist" in output, output
    status, output = process.run(["experiments.train", "--config=nope2.py", "--workdir=runs/a"])
    assert status == 2 and "error: config file 'nope2.py' does not exist" in output, output
    status, output = process.run(["experiments.evaluate", "--workdir=runs/a", "--nonsense=1"])
    assert status == 2 and "nonsense" in output and "Traceback" not in output, output
  finally:
    process.close()


def test_max_steps_override_clips_total_steps_and_fits_the_schedule(monkeypatch):
  """JTL_MAX_STEPS, which shortens every documented run: total_steps clipped, the warmup and the
  phases fitted into the shorter run (so the config still validates); unset, nothing changes."""
  from experiments.configs import finetune_digits
  from jtl import config as config_lib
  from jtl.errors import ConfigError

  written = finetune_digits.get_config("method=lpft,pretrain=runs/pre")
  assert written.total_steps > 2 and written.optim.warmup_steps >= 2 and written.phases[1][0] >= 2
  monkeypatch.delenv(config_lib.MAX_STEPS_ENV, raising=False)
  assert config_lib.prepare(written).total_steps == written.total_steps
  monkeypatch.setenv(config_lib.MAX_STEPS_ENV, "2")
  short = config_lib.prepare(written)
  assert (short.total_steps, short.optim.warmup_steps) == (2, 1)
  assert [p[0] for p in short.phases] == [0, 1]
  from experiments.configs import protonet_glyphs
  glyph = config_lib.prepare(protonet_glyphs.get_config())  # episodic evaluations: a few episodes
  assert {e.num_episodes for e in glyph.evals.values()} == {config_lib.SMOKE_EPISODES}
  monkeypatch.setenv(config_lib.MAX_STEPS_ENV, str(written.total_steps + 5))  # never lengthens
  assert config_lib.prepare(written).total_steps == written.total_steps
  monkeypatch.setenv(config_lib.MAX_STEPS_ENV, "two")
  with pytest.raises(ConfigError, match="JTL_MAX_STEPS='two' is not a positive whole number"):
    config_lib.prepare(written)


def _fresh_tree(tmp_path: Path) -> Path:
  """A copy of the repository's tree to run in, with `python` and `.venv/bin/python` this
  interpreter (a wrapper script: a symlink would lose the virtual environment)."""
  tree = tmp_path / "jtl"
  shutil.copytree(REPO, tree, ignore=_NOT_COPIED)
  bin_dir = tree / ".venv" / "bin"
  bin_dir.mkdir(parents=True)
  for name in ("python", "python3"):
    wrapper = bin_dir / name
    wrapper.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    wrapper.chmod(wrapper.stat().st_mode | stat.S_IEXEC)
  return tree


def _environment(tree: Path) -> dict[str, str]:
  env = dict(os.environ)
  env.pop("XLA_FLAGS", None)  # one CPU device, as a user has; a command may set its own
  env.pop("PYTEST_XDIST_WORKER", None)
  env.update(PATH=f"{tree / '.venv' / 'bin'}{os.pathsep}{env.get('PATH', '')}", PYTHONPATH=str(tree),
             JTL_MAX_STEPS=MAX_STEPS, TF_CPP_MIN_LOG_LEVEL="3",
             # Two-step runs: XLA's optimisation passes would cost more than the steps themselves.
             JAX_DISABLE_MOST_OPTIMIZATIONS="1")
  return env


# The paradigm guides whose commands take a minute or more on 2 busy cores: `make test-all` runs them,
# `make test` (CI) runs the others (README.md, BUILD.md, and the guides to running, errors, seams...).
SLOW_DOCS = ("docs/glyphs.md", "docs/meta_learning.md", "docs/sweeps.md", "docs/contrastive.md",
             "docs/transfer.md", "docs/distillation.md", "docs/style_transfer.md", "docs/multitask.md")


def _param(doc: str):
  # The glyphs dataset takes over a minute to build: its commands share test_glyphs.py's worker
  # (and TFDS data dir), so it is built once per session.
  glyphs = any("glyphs" in c.text for c in to_run(doc))
  marks = [pytest.mark.xdist_group("glyphs")] if glyphs else []
  return pytest.param(doc, marks=marks + ([pytest.mark.slow] if doc in SLOW_DOCS else []), id=doc)


def shared_outputs(command: Command) -> tuple[str, ...]:
  """What a command writes (`--workdir=runs/...`, `--data_dir=runs/...`) if several documents run it
  word for word; () otherwise."""
  if sum(c.normalised == command.normalised for d in DOCS for c in to_run(d)) < 2:
    return ()
  return tuple(re.findall(r"--(?:workdir|data_dir)=(runs/[\w./-]+)", command.normalised))


@contextlib.contextmanager
def _once_per_session(command: Command, tree: Path):
  """For a command that several documents run word for word, on outputs that do not exist yet: the
  first document to get there runs it and keeps a copy of its outputs for the session (all workers);
  the others wait for that, copy the outputs into their tree, and skip the command. Yields whether
  the command still has to run. So each documented command runs at least once per session."""
  outputs = shared_outputs(command)
  if not outputs or any((tree / o).exists() for o in outputs):
    yield True
    return
  kept = Path(os.environ["JTL_TEST_SESSION_DIR"]) / "docs_outputs" / hashlib.sha1(
      command.normalised.encode()).hexdigest()[:16]
  kept.parent.mkdir(parents=True, exist_ok=True)
  with open(f"{kept}.lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # (released when the file closes: the first one has finished)
    if kept.exists():
      for o in outputs:
        shutil.copytree(kept / o, tree / o, symlinks=True)
      yield False
      return
    yield True
    if all((tree / o).exists() for o in outputs):  # (it ran and succeeded: the caller asserted so)
      copy = Path(tempfile.mkdtemp(dir=kept.parent))
      for o in outputs:
        shutil.copytree(tree / o, copy / o, symlinks=True)
      copy.rename(kept)


def in_process_argv(command: Command) -> list[str] | None:
  """`[module, *arguments]` of a plain `python -m experiments.train|evaluate ...` command, which the
  document's own Python process runs (tests/docs_runner.py); None for anything else (bash runs it):
  shell syntax, an environment prefix, `--verbosity` (read while the modules load)."""
  text = command.text.replace("\\\n", " ")
  lexer = shlex.shlex(text, posix=True, punctuation_chars=True)
  lexer.whitespace_split, lexer.commenters = True, "#"
  try:
    words = list(lexer)
  except ValueError:
    return None
  if (len(words) < 3 or words[0] not in ("python", "python3", ".venv/bin/python") or words[1] != "-m"
      or words[2] not in IN_PROCESS_MODULES or any(set(w) <= set("();<>|&") for w in words)
      or any(c in text.split("#")[0] for c in "$`") or any(w.startswith("--verbosity") for w in words)):
    return None
  return words[2:]


class _DocProcess:
  """tests/docs_runner.py for one document: started on its first command, in the document's tree and
  environment; `run` gives a command's exit status and output."""

  def __init__(self, tree: Path, env: dict[str, str], logs: Path):
    self.tree, self.env, self.logs, self.process, self.count = tree, env, logs, None, 0

  def run(self, argv: list[str]) -> tuple[int | None, str]:
    """(exit status, output); status None: still running after COMMAND_TIMEOUT_S (then stopped)."""
    if self.process is None:
      self.process = subprocess.Popen([sys.executable, str(REPO / "tests" / "docs_runner.py")],
                                      cwd=self.tree, env=self.env, stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
    self.count += 1
    log = self.logs / f"command_{self.count}.log"
    self.process.stdin.write(json.dumps({"argv": argv, "log": str(log)}) + "\n")
    self.process.stdin.flush()
    ready, _, _ = select.select([self.process.stdout], [], [], COMMAND_TIMEOUT_S)
    answer = self.process.stdout.readline() if ready else ""
    output = log.read_text(errors="replace") if log.exists() else ""
    if not answer:
      self.close()
      return (None if not ready else -1), output
    return json.loads(answer)["status"], output

  def close(self) -> None:
    if self.process is not None:
      self.process.stdin.close()
      try:
        self.process.wait(timeout=60)
      except subprocess.TimeoutExpired:
        self.process.kill()
        self.process.wait()
      self.process = None


@pytest.mark.parametrize("doc", [_param(d) for d in DOCS if to_run(d)])
def test_documented_commands_run(doc, tmp_path):
  tree = _fresh_tree(tmp_path)
  env = _environment(tree)
  process = _DocProcess(tree, env, tmp_path)
  try:
    for command in to_run(doc):
      with _once_per_session(command, tree) as to_do:
        if to_do:
          _run_documented(command, tree, env, process)
  finally:
    process.close()


def _run_documented(command: Command, tree: Path, env: dict[str, str], process: _DocProcess) -> None:
  argv = in_process_argv(command)
  if argv is not None:
    status, output = process.run(argv)
  else:
    try:
      result = subprocess.run(["bash", "-c", command.text], cwd=tree, env=env, capture_output=True,
                              text=True, timeout=COMMAND_TIMEOUT_S)
      status, output = result.returncode, result.stdout + result.stderr
    except subprocess.TimeoutExpired:
      status, output = None, ""
  if status is None:
    pytest.fail(f"{command.doc}:{command.line}: still running after {COMMAND_TIMEOUT_S} s:\n"
                f"{command.text}")
  assert status == 0, (
      f"{command.doc}:{command.line}: exit status {status} from the documented command\n"
      f"{command.text}\n--- its output (last lines) ---\n{output[-4000:]}")
