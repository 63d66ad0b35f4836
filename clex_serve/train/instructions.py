"""Chat fine-tuning pairs made from the corpus: questions about stdlib names, answered by their docstrings.

For every public module, class, function and method of the training files with a docstring, the question
names it ("What does json.dumps do?") and the answer is the first sentence or two of its docstring's first
paragraph. Only the training split is used, so held-out perplexity stays held out. The source is parsed with
``ast``, never imported, so the pairs do not depend on what a machine can import.
"""

from __future__ import annotations

import ast
import hashlib
import re
from dataclasses import dataclass

from clex_serve.train.corpus import SourceFile

MAX_ANSWER_CHARS = 240
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z(])")


@dataclass(frozen=True)
class InstructionPair:
    question: str
    answer: str


def summary(docstring: str) -> str | None:
    """The first one or two sentences of the first paragraph, on one line; None when too short to teach."""
    paragraph = docstring.strip().split("\n\n")[0]
    text = " ".join(paragraph.split())
    if len(text) < 12 or text.startswith((">>>", "..", ":")):
        return None
    sentences = _SENTENCE_END.split(text)
    answer = sentences[0]
    if len(sentences) > 1 and len(answer) + 1 + len(sentences[1]) <= MAX_ANSWER_CHARS:
        answer += " " + sentences[1]
    if len(answer) > MAX_ANSWER_CHARS:
        answer = answer[:MAX_ANSWER_CHARS].rsplit(" ", 1)[0] + "..."
    return answer


def _question(kind: str, name: str) -> str:
    # A stable choice of phrasing per name, so the chat model does not learn one fixed question.
    pick = hashlib.sha256(name.encode()).digest()[0] % 3
    if kind == "module":
        return (
            f"What is the {name} module for?",
            f"What does the Python module {name} do?",
            f"Explain the {name} module.",
        )[pick]
    if kind == "class":
        return (f"What is {name}?", f"What does the class {name} represent?", f"Explain {name}.")[pick]
    return (f"What does {name} do?", f"What is {name} used for?", f"Explain {name}.")[pick]


def pairs_from_source(source: SourceFile) -> list[InstructionPair]:
    try:
        tree = ast.parse(source.read())
    except (SyntaxError, ValueError):
        return []  # a few stdlib files are Python 2 examples or templates
    module = source.module_name
    pairs = []

    def add(kind: str, name: str, node) -> None:
        docstring = ast.get_docstring(node)
        answer = summary(docstring) if docstring else None
        if answer:
            pairs.append(InstructionPair(_question(kind, name), answer))

    add("module", module, tree)
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and not node.name.startswith("_"):
            add("function", f"{module}.{node.name}", node)
        elif isinstance(node, ast.ClassDef) and not node.name.startswith("_"):
            add("class", f"{module}.{node.name}", node)
            for item in node.body:
                if isinstance(item, (ast.FunctionDef, ast.AsyncFunctionDef)) and not item.name.startswith("_"):
                    add("function", f"{module}.{node.name}.{item.name}", item)
    return pairs


def instruction_pairs(files: list[SourceFile]) -> list[InstructionPair]:
    return [pair for source in files for pair in pairs_from_source(source)]
