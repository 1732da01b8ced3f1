"""The official OpenAI Python client against an inference worker.

Usage: openai_client.py BASE_URL MODEL. Prints one line per check; exits non-zero on the
first that fails.
"""

import sys

import openai

base_url, model = sys.argv[1], sys.argv[2]
client = openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=180)
messages = [{"role": "user", "content": "Say hello in French."}]

assert [m.id for m in client.models.list()] == [model]

completion = client.chat.completions.create(model=model, messages=messages, max_tokens=16)
assert completion.model == model, completion
assert completion.choices[0].message.content.strip(), completion
assert 1 <= completion.usage.completion_tokens <= 16, completion.usage
print("completion: ok")

deltas = []
for chunk in client.chat.completions.create(
    model=model, messages=messages, max_tokens=16, stream=True
):
    assert chunk.model == model, chunk
    if chunk.choices and chunk.choices[0].delta.content:
        deltas.append(chunk.choices[0].delta.content)
assert "".join(deltas).strip(), deltas
print("stream: ok")

try:
    client.chat.completions.create(model="not-" + model, messages=messages, max_tokens=4)
    sys.exit("a request for another model succeeded")
except openai.NotFoundError as e:
    assert e.code == "model_not_found", e
    assert model in e.message, e
    print("unknown model: NotFoundError")
