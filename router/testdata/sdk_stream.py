"""Streams a chat completion with the official OpenAI SDK and prints the text.

Usage: sdk_stream.py BASE_URL
"""
import sys

from openai import OpenAI


def main() -> None:
    client = OpenAI(base_url=sys.argv[1] + "/v1", api_key="sdk-key", max_retries=0, timeout=30)
    stream = client.chat.completions.create(
        model="tiny",
        messages=[{"role": "user", "content": "Say hello"}],
        max_tokens=16,
        stream=True,
        stream_options={"include_usage": True},
    )
    text = []
    for chunk in stream:
        for choice in chunk.choices:
            if choice.delta and choice.delta.content:
                text.append(choice.delta.content)
    sys.stdout.write("".join(text))


if __name__ == "__main__":
    main()
