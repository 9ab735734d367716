from llama_cpp import Llama

# ruff: noqa: I001  (the script starts with the one line a user changes to switch libraries)
# A llama-cpp-python script, as its users write them, run unchanged on both libraries.
#
#     python llama_cpp_script.py MODEL.gguf > results.json
#
# It touches the high-level API a llama-cpp-python user relies on: loading with a
# seed, greedy completion with stop sequences, log-probabilities, streaming,
# chat with the model's own template (also streamed), seeded sampling,
# tokenize/detokenize and a grammar, and prints what came out as JSON. Only
# results go into the JSON (no ids or timestamps), plus the path of the
# libllama that llama_cpp loaded, under "library".

import json
import sys
from typing import Any

import llama_cpp

QUESTION = "What is the capital of France?"


def main(model_path: str) -> dict[str, Any]:
    llm = Llama(model_path=model_path, n_ctx=512, n_threads=2, seed=1234, logits_all=True,
                verbose=False)  # fmt: skip
    out: dict[str, Any] = {"library": llama_cpp.llama_cpp._lib._name}
    r: Any  # a response: a dict for a whole one, an iterator of dicts for a stream
    out["n_ctx"], out["n_vocab"] = llm.n_ctx(), llm.n_vocab()

    r = llm.create_completion(
        "The three primary colors are", max_tokens=48, temperature=0.0, stop=[".", "\n"]
    )
    out["greedy"] = {
        "text": r["choices"][0]["text"],
        "finish_reason": r["choices"][0]["finish_reason"],
        "usage": r["usage"],
    }

    r = llm.create_completion("Once upon a time", max_tokens=8, temperature=0.0, logprobs=3)
    out["logprobs"] = {"text": r["choices"][0]["text"], "logprobs": r["choices"][0]["logprobs"]}

    r = llm.create_completion(
        "The history of the printing press", max_tokens=24, temperature=0.8, seed=7
    )
    out["sampled"] = r["choices"][0]["text"]

    r = llm.create_completion("def fibonacci(n):\n", max_tokens=24, temperature=0.0, stream=True)
    chunks = [c["choices"][0]["text"] for c in r]
    out["stream"] = {"chunks": chunks, "text": "".join(chunks)}

    messages: list[Any] = [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": QUESTION},
    ]
    r = llm.create_chat_completion(messages=messages, max_tokens=32, temperature=0.0)
    out["chat"] = {
        "role": r["choices"][0]["message"]["role"],
        "content": r["choices"][0]["message"]["content"],
        "finish_reason": r["choices"][0]["finish_reason"],
        "usage": r["usage"],
    }

    r = llm.create_chat_completion(messages=messages, max_tokens=32, temperature=0.0, stream=True)
    deltas = [c["choices"][0]["delta"] for c in r]
    out["chat_stream"] = {
        "deltas": deltas,
        "content": "".join(d.get("content") or "" for d in deltas),
    }

    text = "Tokenizers split text like this: naïve café, 3.14159, and emoji 🙂."
    tokens = llm.tokenize(text.encode("utf-8"))
    out["tokenize"] = {
        "tokens": tokens,
        "no_bos": llm.tokenize(text.encode("utf-8"), add_bos=False),
        "special": llm.tokenize(b"<|im_start|>user", add_bos=False, special=True),
        "detokenized": llm.detokenize(tokens).decode("utf-8"),
    }

    grammar = llama_cpp.LlamaGrammar.from_string('root ::= "yes" | "no"', verbose=False)
    r = llm.create_completion(
        "Question: Is Paris in France? Answer (yes or no):",
        max_tokens=4,
        temperature=0.0,
        grammar=grammar,
    )
    out["grammar"] = r["choices"][0]["text"]
    return out


if __name__ == "__main__":
    json.dump(main(sys.argv[1]), sys.stdout, indent=1, ensure_ascii=False, default=float)
    print()
