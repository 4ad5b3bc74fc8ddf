"""The flags the entry points share are defined once (``code/_cli.py``) and mean the same in each of them:
``--checkpoint`` (a folder against the cwd, or a Hub id), ``--output-dir``, ``--host`` / ``--port``,
``--verbose``, ``--config`` / ``--print-config`` / overrides; and the subcommand tables of
``prepare_data.py`` / ``evaluate.py`` are built by the same code."""

from __future__ import annotations

import ast

import pytest

from entry_points import load_script
from toollmm.core.paths import REPO_ROOT

CODE = REPO_ROOT / "code"
#: flags that only ``code/_cli.py`` may define with ``add_argument``
SHARED_FLAGS = {"--checkpoint", "--host", "--port", "--output-dir", "--verbose", "--print-config"}


def entry(name: str):
    return load_script(f"code/{name}.py", f"{name}_entry_shared")


#: each entry point's way to parse ``extra`` flags (plus what it needs to parse at all)
PARSERS = {
    "app": lambda extra: entry("app").parse_args(extra),
    "serve": lambda extra: entry("serve").parse_args(extra),
    "inference": lambda extra: entry("inference").parse_args([*extra, "--prompt", "hi"]),
    "evaluate run": lambda extra: (
        entry("evaluate")
        .build_parser()
        .parse_args(["run", "--benchmark", "gpt4tools", "--data", "ref.json", *extra])
    ),
}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_checkpoint_output_dir_and_verbose_mean_the_same_in_every_entry_point(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "stage_3").mkdir(parents=True)
    parse = PARSERS[name]
    args = parse(["--checkpoint", "runs/stage_3", "--verbose"])
    assert args.checkpoint == str(tmp_path / "runs" / "stage_3")  # a folder: against the cwd
    assert args.verbose is True
    assert parse(["--checkpoint", "owner/name"]).checkpoint == "owner/name"  # no such folder: a Hub id
    if name != "evaluate run":
        args = parse(["--checkpoint", "owner/name", "--output-dir", "media", "--config", "x.yaml", "a.b=1"])
        assert args.output_dir == str(tmp_path / "media")
        assert args.config == [str(tmp_path / "x.yaml")] and args.overrides == ["a.b=1"]
        assert args.print_config is False


@pytest.mark.parametrize(("name", "port"), [("app", 7860), ("serve", 8000)])
def test_servers_bind_this_machine_only_unless_told(name, port):
    args = PARSERS[name](["--checkpoint", "owner/name"])
    assert (args.host, args.port) == ("127.0.0.1", port)
    args = PARSERS[name](["--checkpoint", "owner/name", "--host", "0.0.0.0", "--port", "9"])
    assert (args.host, args.port) == ("0.0.0.0", 9)


def test_shared_flags_read_the_same_in_every_help_text(capsys):
    """The help line of each shared flag is one text, whichever entry point prints it."""
    seen: dict[str, dict[str, str]] = {}
    for name in ("app", "serve", "inference"):
        with pytest.raises(SystemExit):
            entry(name).parse_args(["--help"])
        text = " ".join(capsys.readouterr().out.split()).split(" options: ", 1)[1]  # past the usage line
        for flag in ("--checkpoint CHECKPOINT", "--output-dir OUTPUT_DIR", "--print-config"):
            assert flag in text, (name, flag)
            seen.setdefault(flag, {})[name] = text.split(flag, 1)[1].split(" --", 1)[0]
    for flag, helps in seen.items():
        assert len(set(helps.values())) == 1, (flag, helps)


def test_subcommand_tables_of_prepare_data_and_evaluate_are_built_alike():
    for name, expected in (("prepare_data", {"convert", "formats"}), ("evaluate", {"score", "run", "demo"})):
        parser = entry(name).build_parser()
        sub = next(a for a in parser._actions if a.dest == "command")
        assert expected <= set(sub.choices), name
        for sub_name, p in sub.choices.items():
            assert "--verbose" in p._option_string_actions, (name, sub_name)
            assert callable(p.get_default("run")), (name, sub_name)


def _defined_flags(path) -> set[str]:
    """String literals starting with ``--`` passed to ``add_argument`` in ``path``."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call) and getattr(node.func, "attr", None) == "add_argument":
            out |= {
                a.value for a in node.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")
            }
    return out


def test_shared_flags_are_defined_only_in_code_cli():
    """No entry point writes its own ``--checkpoint`` / ``--host`` / ... block (they come from _cli)."""
    assert SHARED_FLAGS - {"--print-config"} <= _defined_flags(CODE / "_cli.py")
    offenders = {
        f.name: sorted(_defined_flags(f) & SHARED_FLAGS)
        for f in sorted(CODE.glob("*.py"))
        if f.name != "_cli.py" and _defined_flags(f) & SHARED_FLAGS
    }
    assert not offenders, offenders


def _library_parsers() -> set[str]:
    """Library files that call ``ArgumentParser`` / ``add_parser`` / ``add_subparsers`` / ``add_argument``."""
    names = {"ArgumentParser", "add_parser", "add_subparsers", "add_argument"}
    out = set()
    for f in sorted((CODE / "toollmm").rglob("*.py")):
        for node in ast.walk(ast.parse(f.read_text(encoding="utf-8"))):
            func = node.func if isinstance(node, ast.Call) else None
            if func is not None and (
                getattr(func, "attr", None) in names or getattr(func, "id", None) in names
            ):
                out.add(f.relative_to(CODE).as_posix())
                break
    return out


def test_no_library_module_builds_a_parser():
    """Command-line parsing lives in code/*.py; the library gives flag types only."""
    assert _library_parsers() == set()
