"""Greedy decoding through llama-cpp-python on whichever libllama LLAMA_CPP_LIB_PATH names.

    LLAMA_CPP_LIB_PATH=DIR python parity_probe.py MODEL OUT.npz

Imports llama_cpp directly (not llama_sparse), so the same script runs on our
build and on the unpatched reference. For each prompt it saves the greedy
tokens, the first step's logits and a hash of every step's logits.
"""

from __future__ import annotations

import hashlib
import sys

import llama_cpp
import numpy as np

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    ",
    "Once upon a time, in a small village by the sea,",
]
N_TOKENS = 64


def main(model: str, out: str) -> None:
    llm = llama_cpp.Llama(model_path=model, n_ctx=512, n_threads=2, seed=0, verbose=False)
    n_vocab = llm.n_vocab()
    result: dict[str, np.ndarray] = {"lib": np.array(llama_cpp.llama_cpp._lib._name)}
    for i, prompt in enumerate(PROMPTS):
        llm.reset()
        llm.eval(llm.tokenize(prompt.encode()))
        tokens, hashes = [], []
        for step in range(N_TOKENS):
            logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).copy()
            if step == 0:
                result[f"logits_{i}"] = logits
            hashes.append(hashlib.sha256(logits.tobytes()).hexdigest())
            tokens.append(int(np.argmax(logits)))
            llm.eval([tokens[-1]])
        result[f"tokens_{i}"] = np.array(tokens, dtype=np.int32)
        result[f"hashes_{i}"] = np.array(hashes)
    np.savez(out, **result)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
