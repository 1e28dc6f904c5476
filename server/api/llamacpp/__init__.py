"""llama-server's native dialect (/completion, /infill, /tokenize, ...): llama.vscode, Continue."""
