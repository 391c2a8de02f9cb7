"""Ask a running server for per-token signals and a deepconf early stop, through the native
API and the OpenAI-compatible API.  Usage: python examples/signals_client.py [URL]"""

import sys

import openai
import requests

url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:30000"
entropy = {
    "policy": "deepconf",
    "params": {"threshold": 5.0, "window_size": 16},
    "return_signals": ["entropy", "confidence", "group_confidence"],
}

native = requests.post(
    f"{url}/generate",
    json={
        "text": "Write a haiku about rain.",
        "sampling_params": {"max_new_tokens": 64, "temperature": 0.8, "custom_params": {"entropy": entropy}},
    },
    timeout=300,
).json()
info = native["meta_info"]["entropy"]
print("native:", repr(native["text"]))
print("  finish:", native["meta_info"]["finish_reason"])
print("  events:", info["events"])
print("  entropy per token:", [round(h, 2) for h in info["signals"]["entropy"]])

client = openai.OpenAI(base_url=f"{url}/v1", api_key="none")
chat = client.chat.completions.create(
    model="default",
    messages=[{"role": "user", "content": "Name three rivers."}],
    max_tokens=48,
    extra_body={"custom_params": {"entropy": {"return_signals": ["confidence"]}}},
)
print("openai:", repr(chat.choices[0].message.content))
print("  confidence per token:", [round(c, 2) for c in chat.metadata["entropy"][0]["signals"]["confidence"]])
