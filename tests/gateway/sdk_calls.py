"""Drives nook's LLM gateway with the real openai and anthropic SDKs, streamed and not.

Usage: python3 sdk_calls.py BASE   (BASE is http://HOST:PORT reaching 169.254.169.254:80 from
inside a VM). Prints one JSON object per call: its name and the usage the SDK saw.
The SDKs get a dummy key: the gateway adds the real one.
"""
import json
import sys

import anthropic
import openai

base = sys.argv[1].rstrip("/")
ant = anthropic.Anthropic(base_url=f"{base}/gateway/llm/anthropic", api_key="dummy", max_retries=0)
oai = openai.OpenAI(base_url=f"{base}/gateway/llm/openai/v1", api_key="dummy", max_retries=0)


def out(name, **kw):
    print(json.dumps({"call": name, **kw}), flush=True)


msg = ant.messages.create(
    model="fake-claude", max_tokens=4,
    messages=[{"role": "user", "content": "hello there from the sdk CACHEME"}],
)
u = msg.usage
out("anthropic", text=msg.content[0].text, input=u.input_tokens, output=u.output_tokens,
    cache_read=u.cache_read_input_tokens or 0, cache_write=u.cache_creation_input_tokens or 0)

with ant.messages.stream(
    model="fake-claude", max_tokens=5,
    messages=[{"role": "user", "content": "stream me please CACHEME"}],
) as stream:
    text = "".join(stream.text_stream)
    final = stream.get_final_message()
u = final.usage
out("anthropic-stream", text=text, input=u.input_tokens, output=u.output_tokens,
    cache_read=u.cache_read_input_tokens or 0, cache_write=u.cache_creation_input_tokens or 0)

count = ant.messages.count_tokens(model="fake-claude", messages=[{"role": "user", "content": "one two three"}])
out("anthropic-count", input=count.input_tokens)

chat = oai.chat.completions.create(model="fake-gpt", max_tokens=3, messages=[{"role": "user", "content": "hi gpt"}])
u = chat.usage
out("openai-chat", text=chat.choices[0].message.content, input=u.prompt_tokens, output=u.completion_tokens)

chunks = list(oai.chat.completions.create(
    model="fake-gpt", max_tokens=5, stream=True, stream_options={"include_usage": True},
    messages=[{"role": "user", "content": "stream gpt with usage"}],
))
u = chunks[-1].usage
out("openai-chat-stream", text="".join(c.choices[0].delta.content or "" for c in chunks if c.choices),
    input=u.prompt_tokens, output=u.completion_tokens)

chunks = list(oai.chat.completions.create(
    model="fake-gpt", max_tokens=2, stream=True,
    messages=[{"role": "user", "content": "stream gpt without usage"}],
))
out("openai-chat-stream-no-usage", usage_chunks=sum(1 for c in chunks if c.usage is not None),
    text="".join(c.choices[0].delta.content or "" for c in chunks if c.choices))

resp = oai.responses.create(model="fake-gpt", input="respond to me", max_output_tokens=4)
out("openai-responses", text=resp.output_text, input=resp.usage.input_tokens, output=resp.usage.output_tokens)

with oai.responses.stream(model="fake-gpt", input="respond in a stream", max_output_tokens=5) as s:
    for _ in s:
        pass
    final = s.get_final_response()
out("openai-responses-stream", text=final.output_text, input=final.usage.input_tokens,
    output=final.usage.output_tokens)

try:
    ant.messages.create(model="not-a-model", max_tokens=4, messages=[{"role": "user", "content": "x"}])
    out("unknown-model", status=200)
except anthropic.APIStatusError as e:
    out("unknown-model", status=e.status_code, message=e.message)
