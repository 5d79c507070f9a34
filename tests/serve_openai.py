#!/usr/bin/env python3
"""whet serve through the official `openai` Python client (run by whet-serve's test
`the_official_openai_client_works`, which starts the server).

    python3 tests/serve_openai.py BASE_URL PROMPT_IDS_JSON PATTERNS_TEXT REGEX_TEXT
"""
import json
import sys
from concurrent.futures import ThreadPoolExecutor

import openai

url, ids, want_patterns, want_regex = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3], sys.argv[4]
client = openai.OpenAI(base_url=url, api_key="unused")

models = [m.id for m in client.models.list()]
assert models == ["base", "patterns", "regex"], models

c = client.completions.create(model="patterns", prompt=ids, max_tokens=8, temperature=0)
assert c.choices[0].text == want_patterns, (c.choices[0].text, want_patterns)
assert c.usage.prompt_tokens == len(ids) and c.usage.completion_tokens == 8, c.usage

chat = dict(model="regex", messages=[{"role": "user", "content": "hello"}], max_tokens=10, temperature=0)
whole = client.chat.completions.create(**chat)
text = whole.choices[0].message.content
usage = None
pieces = []
for chunk in client.chat.completions.create(**chat, stream=True, stream_options={"include_usage": True}):
    if chunk.usage is not None:
        usage = chunk.usage
    for choice in chunk.choices:
        if choice.delta.content:
            pieces.append(choice.delta.content)
assert "".join(pieces) == text, (pieces, text)
assert usage is not None and usage.total_tokens == whole.usage.total_tokens, (usage, whole.usage)


def one(model):
    return client.completions.create(model=model, prompt=ids, max_tokens=8, temperature=0).choices[0].text


with ThreadPoolExecutor(2) as pool:
    got = list(pool.map(one, ["patterns", "regex"]))
assert got == [want_patterns, want_regex], got

try:
    client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    raise AssertionError("an unknown model was accepted")
except openai.NotFoundError as e:
    assert "no model `nope`" in str(e), e

print("openai client: all checks passed")
