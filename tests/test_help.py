"""Every command's --help: each flag has a help line, and a flag with a default shows it exactly once."""
import argparse
import re

import pytest

import run_simvtp_finetuning
import run_simvtp_pretraining
import run_simvtp_vis
import search
import synthetic_dataset
import video_tools



def _parsers() -> dict[str, argparse.ArgumentParser]:
    top = {"run_simvtp_pretraining.py": run_simvtp_pretraining.get_args_parser(),
           "run_simvtp_finetuning.py": run_simvtp_finetuning.get_args_parser(),
           "run_simvtp_vis.py": run_simvtp_vis.get_args_parser(),
           "synthetic_dataset.py": synthetic_dataset.get_args_parser(),
           "video_tools.py": video_tools.build_parser(),
           "search.py": search.get_args_parser()}
    found = dict(top)
    for name, parser in top.items():
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                found.update({f"{name} {sub}": p for sub, p in action.choices.items()})
    return found


PARSERS = _parsers()


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_every_flag_has_help_and_shows_its_default_once(name):
    parser = PARSERS[name]
    formatter = parser._get_formatter()
    problems = []
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
            continue
        flag = "/".join(action.option_strings) or action.dest
        if not action.help:
            problems.append(f"{flag}: no help")
            continue
        shown = len(re.findall(r"\bdefault\b", formatter._expand_help(action), re.IGNORECASE))
        has_default = action.option_strings and action.default not in (None, False, argparse.SUPPRESS) \
            and not action.required
        if shown > 1 or (has_default and shown != 1):
            problems.append(f"{flag}: default shown {shown} times: {formatter._expand_help(action)!r}")
    assert not problems, f"{name}:\n" + "\n".join(problems)
    parser.format_help()  # and the whole page renders
