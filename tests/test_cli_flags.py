"""One command line: a flag means the same thing in every tool, every flag says what it does."""
import argparse

import pytest

from tokenslim.cli import COMMANDS, build_parser, main
from tokenslim.cli.flags import FLAGS


def _subparsers():
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def _options(sub):
    return {s: a for a in sub._actions for s in a.option_strings}


def test_every_tool_is_reachable_and_every_flag_has_help():
    subs = _subparsers()
    assert set(subs) == set(COMMANDS)
    for name, sub in subs.items():
        for action in sub._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            assert action.help, f"tokenslim {name} {action.option_strings} has no help text"


def test_shared_flags_agree_across_tools():
    subs = _subparsers()
    canonical = {flags[0]: spec for flags, spec in FLAGS.values()}
    seen = {flag: [] for flag in canonical}
    for name, sub in subs.items():
        for flag, action in _options(sub).items():
            if flag not in canonical or action.help == argparse.SUPPRESS:
                continue
            spec = canonical[flag]
            seen[flag].append(name)
            assert action.type == spec.get("type"), (name, flag)
            assert action.nargs == spec.get("nargs", action.nargs), (name, flag)
            assert action.help.startswith(spec["help"]), (name, flag)  # a tool may add to it, never reword it
    # The flags the issue found disagreeing now exist, with one meaning, wherever they apply.
    for flag, tools in {"--quiet": set(COMMANDS), "--threads": set(COMMANDS) - {"macs"},
                        "--checkpoint": set(COMMANDS) - {"demo"},
                        "--out": {"demo", "sweep", "tune", "recover", "vis", "export", "probe"},
                        "--onnx": {"eval", "benchmark"},
                        "--jsonl": {"eval", "benchmark"}, "--eval-batch-size": {"eval", "sweep", "tune", "probe"},
                        "--batch-size": {"benchmark", "sweep", "tune", "demo"},
                        "--limit": {"eval", "sweep", "tune", "recover", "vis", "demo", "probe"}}.items():
        assert set(seen[flag]) == tools, flag
    for name, sub in subs.items():
        settings = _options(sub).get("--settings")
        if settings is not None:
            assert settings.nargs == "+", name  # one or more everywhere


@pytest.mark.parametrize("tool,old,new,value", [
    ("sweep", "--bench-batch-size", "batch_size", "8"), ("eval", "--json", "jsonl", "x.jsonl"),
    ("eval", "--batch-size", "eval_batch_size", "8"), ("vis", "--images", "limit", "3"),
    ("demo", "--test-images", "limit", "50"), ("recover", "--method", "trainable", "lora"),
    ("recover", "--batch-size", "train_batch_size", "8"),
])
def test_old_spellings_are_hidden_aliases(tool, old, new, value, capsys):
    required = {"eval": ["--data", "d"], "sweep": ["--data", "d"], "vis": ["--data", "d"], "demo": [],
                "recover": ["--data", "d", "--settings", "r=2"]}[tool]
    args = build_parser().parse_args([tool, *required, old, value])
    assert str(getattr(args, new)) == value
    assert f"{old} is now" in capsys.readouterr().err
    shown = _subparsers()[tool].format_help().replace("[", " ").replace("]", " ").split()
    assert old not in shown


def test_random_weights_are_refused_where_accuracy_is_measured(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["eval", "--model", "vit_tiny_patch16_224", "--data", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--random-weights" in err and "random weights" in err
