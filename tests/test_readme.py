"""Every claim README.md and the recipes make that can be checked cheaply on CPU holds.

Everything is found by parsing, not listed here, so the test follows the README as it changes:
- every repository path named (in code spans and code blocks, directory trees included) exists;
  `<placeholder>` parts must match at least one file; paths under git-ignored folders (run outputs)
  are skipped;
- every `erc_megatron.x.y` name resolves (module or attribute);
- every command shown is checked as far as CPU allows without launching a job: `erc-megatron SUB`
  (also via `torchrun -m erc_megatron.cli` / `python -m erc_megatron.dist.mpi`) runs `SUB --help`
  and each `--option` shown is one SUB accepts; `--config` files load and validate; concrete
  `section.key=value` overrides validate; scripts exist and pass `bash -n`; Python files compile;
  `pip install -e ".[extra]"` names declared extras; `torch==X` is the torch in use;
- every config key shown (`trainer.save_every`, or the keys listed after a section as
  `section` (`key`, ...)) is a field of the config tree;
- every recipe in examples/ loads and validates, and the commands and paths in its comments hold.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import importlib
import io
import py_compile
import re
import shlex
import subprocess
from importlib.metadata import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
RECIPES = sorted((REPO / "examples").glob("*.yaml"))
PATH_SUFFIXES = (".py", ".sh", ".sbatch", ".yaml", ".yml", ".md", ".toml", ".cfg", ".ini", ".txt", ".json")


# ---------------------------------------------------------------------------------------------- parsing
def code_blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block."""
    return [(m.group(1).strip(), m.group(2)) for m in re.finditer(r"^```([^\n]*)\n(.*?)^```", text, re.M | re.S)]


def _outside_blocks(text: str) -> str:
    return re.sub(r"^```[^\n]*\n.*?^```", "", text, flags=re.M | re.S)


def code_spans(text: str) -> list[str]:
    """Inline code, which may wrap over lines within a paragraph."""
    return [" ".join(s.split()) for s in re.findall(r"`((?:[^`\n]|\n(?!\s*\n))+)`", _outside_blocks(text))]


def prose_paths(text: str) -> list[str]:
    """File paths written as plain words (`see shared/spec/x.md`): a folder and a file suffix."""
    prose = re.sub(r"`[^`]*`", "", _outside_blocks(text))
    suffixes = "|".join(re.escape(x[1:]) for x in PATH_SUFFIXES)
    return re.findall(rf"(?<![\w/.:-])((?:[\w.-]+/)+[\w.-]+\.(?:{suffixes}))(?![\w/])", prose)


def tree_paths(body: str) -> list[str]:
    """Paths of a directory-tree block: `name/  text` lines, indentation meaning "inside"."""
    out, stack = [], []  # stack of (indent, path)
    for line in body.splitlines():
        m = re.match(r"^(\s*)((?:[\w.-]+/ ?)+)(?:\s{2,}.*)?$", line)
        if not m:
            continue
        indent = len(m.group(1))
        while stack and stack[-1][0] >= indent:
            stack.pop()
        parent = stack[-1][1] if stack else ""
        names = m.group(2).split()
        for name in names:
            out.append(parent + name)
        if len(names) == 1:
            stack.append((indent, parent + names[0]))
    return out


def is_tree_block(body: str) -> bool:
    lines = [line for line in body.splitlines() if line.strip()]
    return bool(lines) and all(re.match(r"^\s*(?:[\w.-]+/ ?)+(?:\s{2,}.*)?$", line) for line in lines)


def commands_in(body: str) -> list[str]:
    """Shell commands of a code block or span: comments dropped, `&&` / `;` chains split."""
    out = []
    for line in body.splitlines():
        line = re.sub(r"(^|\s)#.*$", "", line).strip()
        out += [part.strip() for part in re.split(r"&&|;|\|\|", line) if part.strip()]
    return out


COMMAND_START = re.compile(r"^(erc-megatron|python3?|torchrun|bash|sbatch|srun|mpirun|pip3?|launch/|\./)\b")


def readme_commands(text: str) -> list[str]:
    cmds = []
    for lang, body in code_blocks(text):
        if lang in ("bash", "sh", "shell", "console", "") and not is_tree_block(body):
            cmds += [c for c in commands_in(body) if COMMAND_START.match(c)]
    cmds += [c for span in code_spans(text) for c in commands_in(span) if COMMAND_START.match(c)]
    return list(dict.fromkeys(cmds))


PATH_TOKEN = re.compile(r"(?<![\w/.:-])((?:\.?[\w<>*.-]+/)+[\w<>*.-]*|[\w<>*-]+(?:\.[\w-]+)*(?:%s))(?![\w/])"
                        % "|".join(re.escape(s) for s in PATH_SUFFIXES))


def _ignored_top_dirs() -> set[str]:
    gitignore = REPO / ".gitignore"
    names = set()
    for line in gitignore.read_text().splitlines() if gitignore.exists() else []:
        line = line.strip().strip("/")
        if line and not line.startswith("#") and "*" not in line and "/" not in line:
            names.add(line)
    return names


def _top_level() -> set[str]:
    return {p.name for p in REPO.iterdir()}


def named_paths(text: str) -> list[tuple[str, bool]]:
    """(path, from a directory tree) for every repository path a document names: in code spans,
    code blocks and directory trees."""
    found = []
    chunks = code_spans(text)
    for _, body in code_blocks(text):
        if is_tree_block(body):
            found += [(p, True) for p in tree_paths(body)]
        else:
            chunks.append(body)
    for chunk in chunks:
        found += [(token, False) for token in PATH_TOKEN.findall(chunk)]
    found += [(token, False) for token in prose_paths(text)]
    return list(dict.fromkeys(found))


BARE_NAME_SUFFIXES = (".py", ".sh", ".sbatch", ".yaml", ".yml")


def _repo_files_named(name: str) -> list[Path]:
    skip = _ignored_top_dirs() | {".git"}
    return [p for p in REPO.rglob(name) if p.relative_to(REPO).parts[0] not in skip]


def check_path(token: str, tree: bool = False) -> str | None:
    """None if it holds (or is not a repository path); otherwise what is wrong.

    A token is a claim when it starts at a top-level entry of the repository (`launch/x.sh`), or
    has a file suffix (`shared/spec/x.md` must then exist too); a bare recipe or script name
    (`cpu_demo.yaml`) must exist somewhere in the repository. `V/tp` or `beta1/2` are not paths.
    Every entry of a directory tree (`tree=True`) is a claim.
    """
    token = token.rstrip(".,:;")
    if token.startswith(("/", "http", "~")) or "://" in token or "..." in token or "$" in token:
        return None
    rel = token[2:] if token.startswith("./") else token
    first = rel.split("/")[0]
    if first in _ignored_top_dirs():
        return None
    pattern = re.sub(r"<[^>]*>", "*", rel)
    if "/" not in rel.rstrip("/") and not tree:
        if rel.endswith("/"):  # `checkpoints/`: a top-level folder, or a run's output folder
            return None
        if not rel.endswith(BARE_NAME_SUFFIXES):
            return None
        found = [p for p in (glob.glob(str(REPO / "**" / pattern), recursive=True))
                 if Path(p).relative_to(REPO).parts[0] not in _ignored_top_dirs() | {".git"}]
        return None if found else f"{token}: no file of that name in the repository"
    if first not in _top_level() and not rel.endswith(PATH_SUFFIXES) and not tree:
        return None
    if "*" in pattern:
        return None if glob.glob(str(REPO / pattern)) else f"{token}: nothing matches {pattern}"
    return None if (REPO / rel).exists() else f"{token}: no such file or directory"


# ---------------------------------------------------------------------------------------------- checks
def _run_config():
    from erc_megatron.train.config import RunConfig

    return RunConfig


def load_recipe(path: Path, overrides: list[str] = ()):
    from erc_megatron.utils import config_tree

    return config_tree.load(_run_config(), str(path), list(overrides))


def config_field(dotted: str) -> bool:
    """Is `section.key[.key]` a field of the config tree?"""
    cls = _run_config()
    for part in dotted.split("."):
        fields = {f.name: f for f in dataclasses.fields(cls)} if dataclasses.is_dataclass(cls) else {}
        if part not in fields:
            return False
        cls = fields[part].type
        if isinstance(cls, str):  # postponed annotations: resolve by name in the config module
            mod = importlib.import_module(_run_config().__module__)
            cls = getattr(mod, cls, None) or cls
    return True


def _sections() -> set[str]:
    return {f.name for f in dataclasses.fields(_run_config())}


def cli_help(sub: str) -> str:
    from erc_megatron import cli

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit) as exit_:
        cli.main([sub, "--help"])
    assert exit_.value.code == 0, f"erc-megatron {sub} --help exited with {exit_.value.code}"
    return buf.getvalue()


def check_cli_args(args: list[str], where: str) -> list[str]:
    """`erc-megatron` arguments as shown: subcommand exists, --help runs, options exist, config validates."""
    from erc_megatron import __version__, cli

    if args == ["--version"]:  # the top-level parser's own option: it must print the package version
        out = io.StringIO()
        with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as exit_info:
            cli.main(args)
        ok = exit_info.value.code == 0 and out.getvalue().split() == ["erc-megatron", __version__]
        return [] if ok else [f"{where}: printed {out.getvalue()!r}, exit {exit_info.value.code}"]
    if not args or args[0] not in cli.SUBCOMMANDS:
        return [f"{where}: unknown erc-megatron subcommand {args[:1]}; have {sorted(cli.SUBCOMMANDS)}"]
    sub, problems = args[0], []
    text = cli_help(sub)
    for opt in (a.split("=")[0] for a in args[1:] if re.match(r"^\[?--[\w-]+", a)):
        opt = opt.strip("[]")
        if not re.search(rf"(^|[\s,\[]){re.escape(opt)}\b", text):
            problems.append(f"{where}: erc-megatron {sub} has no option {opt}")
    if sub == "train" and "--config" in args:
        config = args[args.index("--config") + 1]
        overrides = [a for a in args[args.index("--config") + 2:]
                     if "=" in a and not a.startswith("[") and a.split(".")[0] in _sections()]
        problems += check_config_arg(config, overrides, where)
    return problems


def check_config_arg(config: str, overrides: list[str], where: str) -> list[str]:
    if re.fullmatch(r"[A-Z_]+|\$\w+", config):  # a placeholder such as CONFIG
        return []
    pattern = re.sub(r"<[^>]*>", "*", config)
    paths = sorted(REPO.glob(pattern)) if "*" in pattern else [REPO / config]
    if not paths or not all(p.exists() for p in paths):
        return [f"{where}: config {config} does not exist"]
    problems = []
    for p in paths:
        try:
            load_recipe(p, overrides)
        except Exception as exc:  # noqa: BLE001 - reported with the command
            problems.append(f"{where}: {p.relative_to(REPO)} {overrides} does not validate: {exc}")
    return problems


def check_command(cmd: str, where: str) -> list[str]:
    try:
        words = shlex.split(cmd)
    except ValueError as exc:
        return [f"{where}: cannot parse {cmd!r}: {exc}"]
    words = [w for w in words if not re.fullmatch(r"[A-Z_]+=\S*", w)]  # VAR=value prefixes
    if not words:
        return []
    prog = words[0]
    if prog == "erc-megatron":
        return check_cli_args(words[1:], where)
    if prog in ("python", "python3", "torchrun", "srun", "mpirun"):
        if "-m" in words:
            module = words[words.index("-m") + 1]
            rest = words[words.index("-m") + 2:]
            if module in ("erc_megatron.cli", "erc_megatron.dist.mpi"):
                return check_cli_args(rest, where)
            if importlib.util.find_spec(module) is None:
                return [f"{where}: no module {module}"]
            if module == "pytest":
                # the words after -m / -k are expressions, not paths
                paths = [p for i, p in enumerate(rest) if not p.startswith("-") and
                         not (i > 0 and rest[i - 1] in ("-m", "-k"))]
                return [f"{where}: {p} does not exist" for p in paths if not (REPO / p.split("::")[0]).exists()]
            return []
        scripts = [w for w in words[1:] if w.endswith(".py")]
        return [p for s in scripts for p in check_script(s, where)]
    if prog in ("bash", "sh", "sbatch"):
        scripts = [w for w in words[1:] if not w.startswith("-")][:1]
        return [p for s in scripts for p in check_script(s, where)]
    if prog.startswith(("launch/", "./")):
        return check_script(prog, where)
    if prog in ("pip", "pip3"):
        return check_pip(words, where)
    return []


def check_script(path: str, where: str) -> list[str]:
    if re.fullmatch(r"[A-Z_]+", path):
        return []
    target = REPO / path
    if not target.exists():
        return [f"{where}: {path} does not exist"]
    if path.endswith(".py"):
        try:
            py_compile.compile(str(target), doraise=True, cfile=None)
        except py_compile.PyCompileError as exc:
            return [f"{where}: {path} does not compile: {exc}"]
        return []
    r = subprocess.run(["bash", "-n", str(target)], capture_output=True, text=True)
    return [f"{where}: bash -n {path}: {r.stderr.strip()}"] if r.returncode else []


def check_pip(words: list[str], where: str) -> list[str]:
    import torch

    problems = []
    extras = set(metadata("erc-megatron").get_all("Provides-Extra") or [])
    for w in words[2:]:
        m = re.fullmatch(r"(?:-e\s*)?\.\[([\w,-]+)\]", w)
        if m:
            problems += [f"{where}: no extra [{e}] (declared: {sorted(extras)})" for e in m.group(1).split(",")
                         if e not in extras]
        m = re.fullmatch(r"torch==([\w.]+)", w)
        if m and torch.__version__.split("+")[0] != m.group(1):
            problems.append(f"{where}: pins torch=={m.group(1)}, the torch in use is {torch.__version__}")
    return problems


def dotted_names(text: str) -> list[str]:
    return list(dict.fromkeys(re.findall(r"\berc_megatron(?:\.\w+)+", " ".join(code_spans(text)))))


def resolve(dotted: str) -> bool:
    parts = dotted.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        try:
            for attr in parts[i:]:
                obj = getattr(obj, attr)
        except AttributeError:
            return False
        return True
    return False


def config_keys_named(text: str) -> list[str]:
    """`section.key` spans, and `section` (`key`, ...) lists."""
    sections = _sections()
    keys = []
    for span in code_spans(text):
        m = re.fullmatch(r"([a-z_]+(?:\.[a-z_0-9]+)+)(?:=\S+)?", span.strip())
        if m and m.group(1).split(".")[0] in sections:
            keys.append(span.strip())
    for m in re.finditer(r"`([a-z_]+)` \(", text):
        if m.group(1) not in sections:
            continue
        depth, i = 1, m.end()
        while i < len(text) and depth:
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        for span in re.findall(r"`([^`]+)`", text[m.end():i - 1]):
            name = re.match(r"^([a-z_][a-z_0-9]*)(?::.*)?$", span.strip())
            if name:
                keys.append(f"{m.group(1)}.{name.group(1)}")
    return list(dict.fromkeys(keys))


# ---------------------------------------------------------------------------------------------- tests
TEXT = README.read_text()


def test_parser_finds_what_a_readme_holds():
    """The parser itself, on a made-up README (so a parsing bug cannot hide a broken claim)."""
    sample = ("Run `erc-megatron serve --model-path DIR [--port]` and `launch/x.sh N`.\n"
              "```bash\npip install -e \".[dev]\" && python -m pytest -q tests  # CI\n```\n"
              "```\npkg/\n  sub/       text\n  a/ b/     two\nnotes/     more\n```\n"
              "Sections: `loss` (`eps_low`, `agg` token-mean, `fused: true`), `trainer.steps=3`, "
              "see `erc_megatron.cli`.\n"
              "As in notes/spec/a.md, `erc_megatron.utils.console.say(msg,\n  more)` prints.\n")
    assert readme_commands(sample) == ['pip install -e ".[dev]"', "python -m pytest -q tests",
                                       "erc-megatron serve --model-path DIR [--port]", "launch/x.sh N"]
    assert named_paths(sample) == [("pkg/", True), ("pkg/sub/", True), ("pkg/a/", True), ("pkg/b/", True),
                                   ("notes/", True), ("launch/x.sh", False), ("notes/spec/a.md", False)]
    assert check_path("notes/", tree=True) and check_path("notes/") is None  # a run's output folder, say
    assert dotted_names(sample) == ["erc_megatron.cli", "erc_megatron.utils.console.say"]
    assert config_keys_named(sample) == ["trainer.steps=3", "loss.eps_low", "loss.agg", "loss.fused"]
    assert check_path("launch/x.sh") and check_path("runs/demo/metrics.jsonl") is None
    assert check_path("examples/<recipe>.yaml") is None and check_path("examples/<r>.toml")


def test_every_path_the_readme_names_exists():
    paths = named_paths(TEXT)
    assert len(paths) >= 5, paths
    problems = [p for p in (check_path(t, tree) for t, tree in paths) if p]
    assert not problems, "\n".join(problems)


def test_every_erc_megatron_name_resolves():
    names = dotted_names(TEXT)
    assert names
    assert not [n for n in names if not resolve(n)]


def test_every_config_key_shown_is_a_field():
    keys = config_keys_named(TEXT)
    assert keys
    assert not [k for k in keys if not config_field(k.split("=")[0])], keys
    concrete = [k for k in keys if "=" in k]
    if concrete:
        load_recipe(RECIPES[0], concrete)


def test_every_command_shown_checks_out():
    cmds = readme_commands(TEXT)
    assert any(c.startswith("erc-megatron") for c in cmds), cmds
    problems = [p for c in cmds for p in check_command(c, f"README `{c}`")]
    assert not problems, "\n".join(problems)


def test_every_subcommand_has_help():
    from erc_megatron import cli

    for sub in cli.SUBCOMMANDS:
        assert "usage: erc-megatron" in cli_help(sub), sub


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.name for p in RECIPES])
def test_recipe_validates_and_its_comments_hold(recipe):
    cfg = load_recipe(recipe)
    assert cfg.trainer.steps >= 1
    comments = "\n".join(line.lstrip("# ") for line in recipe.read_text().splitlines() if line.startswith("#"))
    problems = [p for c in commands_in(comments) if COMMAND_START.match(c)
                for p in check_command(c, f"{recipe.name} `{c}`")]
    problems += [p for t in PATH_TOKEN.findall(comments) if (p := check_path(t))]
    assert not problems, "\n".join(problems)


def test_the_checks_can_fail():
    """Each kind of broken claim is reported (so a passing README test means something)."""
    bad = {
        "erc-megatron serve --no-such-option": "has no option --no-such-option",
        "erc-megatron frobnicate": "unknown erc-megatron subcommand",
        "torchrun -m erc_megatron.cli train --config examples/cpu_demo.yaml trainer.steps=0": "does not validate",
        "torchrun -m erc_megatron.cli train --config examples/nope.yaml": "does not exist",
        "launch/slurm/erc_dapo_7b.sbatch": "does not exist",
        'pip install -e ".[nope]"': "no extra [nope]",
        "pip install torch==1.0.0": "pins torch==1.0.0",
        "python -m erc_megatron.no_such_module": "no module",
    }
    for cmd, message in bad.items():
        problems = check_command(cmd, "x")
        assert any(message in p for p in problems), (cmd, problems)
    assert not resolve("erc_megatron.utils.console.no_such_name")
    assert not config_field("trainer.no_such_key") and config_field("trainer.steps")
