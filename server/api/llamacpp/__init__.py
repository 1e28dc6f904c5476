"""llama-server's native API (/completion, /infill, /tokenize, ...) for llama.vscode, Tabby."""
