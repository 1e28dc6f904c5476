"""llama-server native dialect (/completion, /infill, /tokenize, ...) for llama.vscode, Continue, Tabby."""
