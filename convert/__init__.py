"""The llama-sparse converter: dense GGUF in, sparse GGUF (docs/FORMAT.md) out."""
