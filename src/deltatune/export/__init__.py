"""Export for other runtimes: ``gguf`` (llama.cpp) — a merged model or a LoRA adapter file."""
