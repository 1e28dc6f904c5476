"""``codeserve quantize``: build a GGUF quantization ladder and measure what each rung costs."""
